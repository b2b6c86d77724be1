"""``gqaprune eval`` / ``evaluate_lora_model.py``: perplexity and zero-shot accuracy of a model.

With ``--base-model`` (the unpruned original) it evaluates three models one after the
other on the same data and protocol: original, pruned (``--model`` alone) and recovered
(``--model`` + ``--adapter``, or a merged folder given as ``--recovered``), and writes
the side-by-side table, recovery % and the guide's verdict (evaluate/compare.py).
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gqaprune.options import opt

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    model: str = opt("smollm2-135m", "model: checkpoint folder, Hub id, .gguf, alias, or legacy pickle (with "
                     "--base-model: the pruned model)", aliases=("--pruned-model", "--pruned_model"))
    adapter: str | None = opt(None, "LoRA adapter folder to apply on top of --model", aliases=("--lora-dir", "--lora_dir"))
    base_model: str | None = opt(None, "the unpruned original: also evaluate it and the pruned model without the "
                                 "adapter, and write the side-by-side table with recovery % and the verdict")
    recovered: str | None = opt(None, "with --base-model: a merged recovered folder (instead of --model + --adapter)")
    ppl: list[str] = opt(factory=lambda: ["wikitext2"], help="perplexity datasets: wikitext2, ptb, c4 or files")
    seq_len: int = opt(128, "perplexity window length in tokens (LLM-Pruner and the seed guide use 128)")
    stride: int | None = opt(None, "sliding-window stride (default: the window length, i.e. no overlap)")
    max_tokens: int | None = opt(None, "score only the first N tokens of each dataset (quick runs)")
    tasks: list[str] = opt(factory=list, help="zero-shot tasks (lm-evaluation-harness names: boolq, piqa, hellaswag, "
                           "winogrande, arc_easy, arc_challenge, openbookqa, or 'all')")
    limit: int | None = opt(None, "examples per zero-shot task (quick runs)")
    batch_size: int = opt(8, "windows / examples per forward pass")
    output: str | None = opt(None, "folder to write eval.json and eval.md into", aliases=("--output-dir", "--output_dir"))
    dtype: str | None = opt(None, "fp32, bf16 or fp16 (default: bf16 on capable GPUs, else fp32)")
    device: str | None = opt(None, "device (default: cuda if available)")
    allow_pickle: bool = opt(False, "allow loading a legacy pickled model (runs code from the file)")


@dataclass
class EvalResult:
    model: str
    adapter: str | None
    ppl: list[dict] = field(default_factory=list)
    tasks: dict = field(default_factory=dict)
    zeroshot_md: str = ""

    def to_dict(self) -> dict:
        return {"model": self.model, "adapter": self.adapter, "ppl": self.ppl, "tasks": self.tasks}

    def markdown(self) -> str:
        lines = [f"## `{self.model}`" + (f" + adapter `{self.adapter}`" if self.adapter else ""), ""]
        if self.ppl:
            lines += ["| dataset | split | window | stride | tokens scored | PPL |", "|---|---|---|---|---|---|"]
            lines += [f"| {p['dataset']} | {p['split']} | {p['seq_len']} | {p['stride']} | {p['n_tokens']:,} | "
                      f"{p['ppl']:.3f} |" for p in self.ppl]
        if self.zeroshot_md:
            lines += ["", self.zeroshot_md]
        return "\n".join(lines) + "\n"


@dataclass
class SuiteResult:
    results: list[EvalResult]
    comparison: object | None = None   # evaluate.compare.Comparison when --base-model is given

    def to_dict(self) -> dict:
        d = {"results": [r.to_dict() for r in self.results]}
        if self.comparison is not None:
            d["comparison"] = self.comparison.to_dict()
        return d

    def markdown(self) -> str:
        parts = ["# Evaluation", ""]
        if self.comparison is not None:
            parts += [self.comparison.markdown(), ""]
        parts += [r.markdown() for r in self.results]
        return "\n".join(parts)


def load_with_adapter(model_ref: str, adapter: str | None, **kw):
    """(model, tokenizer): the base from ``model_ref``, with a PEFT LoRA adapter applied when given."""
    from gqaprune.generate import load_adapter
    from gqaprune.model_io import load_model

    model, tok = load_model(model_ref, **kw)
    if adapter:
        model = load_adapter(model, adapter, base_label=model_ref)
    return model, tok


def evaluate_one(opts: EvalOptions, model, tokenizer, label: str, adapter: str | None = None) -> EvalResult:
    """PPL on each of ``opts.ppl`` and accuracy on each of ``opts.tasks`` for a loaded model."""
    from gqaprune.evaluate.perplexity import perplexity, tokenize_corpus  # noqa: F401

    res = EvalResult(label, adapter)
    for name in opts.ppl:
        res.ppl.append(perplexity(model, tokenizer, name, seq_len=opts.seq_len, stride=opts.stride,
                                  max_tokens=opts.max_tokens, batch_size=opts.batch_size).to_dict())
    if opts.tasks:
        from gqaprune.evaluate.zeroshot import zeroshot

        zs = zeroshot(model, tokenizer, opts.tasks, limit=opts.limit, batch_size=opts.batch_size)
        res.tasks = zs.to_dict()
        res.zeroshot_md = zs.markdown()
    return res


def _load_and_eval(opts: EvalOptions, ref: str, adapter: str | None) -> EvalResult:
    model, tok = load_with_adapter(ref, adapter, dtype=opts.dtype, device=opts.device, allow_pickle=opts.allow_pickle)
    try:
        return evaluate_one(opts, model, tok, ref, adapter)
    finally:
        del model
        gc.collect()


def evaluate_model(opts: EvalOptions, model=None, tokenizer=None) -> SuiteResult:
    """Evaluate ``opts.model`` (+ adapter); with ``base_model``, original vs pruned vs recovered."""
    if opts.base_model is None:
        if model is not None:
            results = [evaluate_one(opts, model, tokenizer, opts.model, opts.adapter)]
        else:
            results = [_load_and_eval(opts, opts.model, opts.adapter)]
        suite = SuiteResult(results)
    else:
        from gqaprune.errors import GQAPruneError
        from gqaprune.evaluate.compare import ModelScores, compare

        if not opts.adapter and not opts.recovered:
            raise GQAPruneError("--base-model compares original, pruned and recovered: give the recovered model as "
                                "--adapter LORA_DIR (on top of --model) or --recovered MERGED_DIR")
        original = _load_and_eval(opts, opts.base_model, None)
        pruned = _load_and_eval(opts, opts.model, None)
        recovered = (_load_and_eval(opts, opts.recovered, None) if opts.recovered
                     else _load_and_eval(opts, opts.model, opts.adapter))
        scores = [ModelScores.from_results(lbl, r.ppl, r.tasks or None)
                  for lbl, r in (("original", original), ("pruned", pruned), ("recovered", recovered))]
        suite = SuiteResult([original, pruned, recovered], compare(*scores))
    if opts.output:
        out = Path(opts.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(suite.to_dict(), indent=2, default=str))
        (out / "eval.md").write_text(suite.markdown())
    return suite
