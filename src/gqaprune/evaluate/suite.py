"""``gqaprune eval``: perplexity (and zero-shot tasks) of a model, saved as JSON with the protocol."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gqaprune.options import opt

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    model: str = opt("smollm2-135m", "model: checkpoint folder, Hub id, .gguf, alias, or legacy pickle")
    adapter: str | None = opt(None, "optional LoRA adapter folder to apply on top of --model")
    ppl: list[str] = opt(factory=lambda: ["wikitext2"], help="perplexity datasets: wikitext2, ptb, c4 or files")
    seq_len: int = opt(128, "perplexity window length in tokens (LLM-Pruner and the seed guide use 128)")
    stride: int | None = opt(None, "sliding-window stride (default: the window length, i.e. no overlap)")
    max_tokens: int | None = opt(None, "score only the first N tokens of each dataset (quick runs)")
    tasks: list[str] = opt(factory=list, help="zero-shot tasks (lm-evaluation-harness names), e.g. boolq,piqa")
    limit: int | None = opt(None, "examples per zero-shot task (quick runs)")
    batch_size: int = opt(8, "windows / examples per forward pass")
    output: str | None = opt(None, "folder to write eval.json and eval.md into")
    dtype: str | None = opt(None, "fp32, bf16 or fp16 (default: bf16 on capable GPUs, else fp32)")
    device: str | None = opt(None, "device (default: cuda if available)")
    allow_pickle: bool = opt(False, "allow loading a legacy pickled model (runs code from the file)")


@dataclass
class EvalResult:
    model: str
    adapter: str | None
    ppl: list[dict] = field(default_factory=list)
    tasks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "adapter": self.adapter, "ppl": self.ppl, "tasks": self.tasks}


def load_with_adapter(model_ref: str, adapter: str | None, **kw):
    """(model, tokenizer): the base from ``model_ref``, with a PEFT LoRA adapter applied when given."""
    from gqaprune.model_io import load_model

    model, tok = load_model(model_ref, **kw)
    if adapter:
        from gqaprune.errors import GQAPruneError

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise GQAPruneError(f"--adapter {adapter}: no adapter_config.json there; point at a LoRA output folder")
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            raise GQAPruneError(f"--adapter {adapter}: does not fit --model {model_ref} ({str(e)[:400]}). "
                                "Use the adapter trained on this base model.") from e
    return model, tok


def evaluate_model(opts: EvalOptions, model=None, tokenizer=None) -> EvalResult:
    """Perplexity on each of ``opts.ppl`` and accuracy on each of ``opts.tasks``."""
    from gqaprune.evaluate.perplexity import perplexity

    if model is None:
        model, tokenizer = load_with_adapter(opts.model, opts.adapter, dtype=opts.dtype, device=opts.device,
                                             allow_pickle=opts.allow_pickle)
    res = EvalResult(opts.model, opts.adapter)
    for name in opts.ppl:
        res.ppl.append(perplexity(model, tokenizer, name, seq_len=opts.seq_len, stride=opts.stride,
                                  max_tokens=opts.max_tokens, batch_size=opts.batch_size).to_dict())
    if opts.tasks:
        from gqaprune.evaluate.zeroshot import zeroshot

        zs = zeroshot(model, tokenizer, opts.tasks, limit=opts.limit, batch_size=opts.batch_size)
        res.tasks = zs.to_dict() if hasattr(zs, "to_dict") else zs
    if opts.output:
        out = Path(opts.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(res.to_dict(), indent=2))
        (out / "eval.md").write_text(to_markdown(res))
    return res


def to_markdown(res: EvalResult) -> str:
    lines = [f"# Evaluation of `{res.model}`" + (f" + adapter `{res.adapter}`" if res.adapter else ""), ""]
    if res.ppl:
        lines += ["| dataset | split | window | stride | tokens scored | PPL |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['dataset']} | {p['split']} | {p['seq_len']} | {p['stride']} | {p['n_tokens']:,} | "
                  f"{p['ppl']:.3f} |" for p in res.ppl]
    if res.tasks:
        lines += ["", "```json", json.dumps(res.tasks, indent=2), "```"]
    return "\n".join(lines) + "\n"
