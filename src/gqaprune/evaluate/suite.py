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

from gqaprune.errors import GQAPruneError
from gqaprune.models.adapters import adapter_files, load_with_adapter
from gqaprune.options import ModelArgs, opt
from gqaprune.models.io import local_path, resolve_model_ref
from gqaprune.outputs import check_output, write_folder

log = logging.getLogger(__name__)


@dataclass
class EvalOptions(ModelArgs):
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
    overwrite: bool = opt(False, "replace the --output folder if gqaprune wrote it")

    def __post_init__(self) -> None:
        super().__post_init__()
        from gqaprune.data.corpora import check_corpus
        from gqaprune.evaluate.zeroshot import parse_tasks

        if self.base_model is not None and not self.adapter and not self.recovered:
            raise GQAPruneError("--base-model compares original, pruned and recovered: give the recovered model as "
                                "--adapter LORA_DIR (on top of --model) or --recovered MERGED_DIR")
        if self.recovered is not None and self.base_model is None:
            raise GQAPruneError("--recovered is compared with --base-model and --model: give --base-model too, or "
                                "evaluate the merged folder alone with --model")
        if self.seq_len < 2:
            raise GQAPruneError(f"--seq-len {self.seq_len}: a window needs at least 2 tokens")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise GQAPruneError(f"--stride {self.stride}: must be between 1 and the window length {self.seq_len} "
                                "(leave it out for non-overlapping windows)")
        for name, v in (("max_tokens", self.max_tokens), ("limit", self.limit), ("batch_size", self.batch_size)):
            if v is not None and v < 1:
                raise GQAPruneError(f"--{name.replace('_', '-')} {v}: must be at least 1")
        for name in self.ppl:
            check_corpus(name, "test", "--ppl")
        if self.tasks:
            self.tasks = parse_tasks(self.tasks)


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


def evaluate_one(opts: EvalOptions, model, tokenizer, label: str, adapter: str | None = None) -> EvalResult:
    """PPL on each of ``opts.ppl`` and accuracy on each of ``opts.tasks`` for a loaded model."""
    from gqaprune.evaluate.perplexity import perplexity

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


def _load_and_eval(opts: EvalOptions, ref: str, adapter: str | None, flag: str = "--model") -> EvalResult:
    model, tok = load_with_adapter(ref, adapter, dtype=opts.dtype, device=opts.device, allow_pickle=opts.allow_pickle,
                                   flag=flag)
    try:
        return evaluate_one(opts, model, tok, ref, adapter)
    finally:
        del model
        gc.collect()


def evaluate_model(opts: EvalOptions, model=None, tokenizer=None) -> SuiteResult:
    """Evaluate ``opts.model`` (+ adapter); with ``base_model``, original vs pruned vs recovered."""
    if model is None:   # every reference is checked before the first model is loaded
        for flag, ref in (("--model", opts.model), ("--base-model", opts.base_model), ("--recovered", opts.recovered)):
            if ref:
                resolve_model_ref(ref, flag)
    if opts.adapter:
        adapter_files(opts.adapter, "--adapter")
    if opts.output:
        inputs = {f: local_path(r) for f, r in (("--model", opts.model), ("--base-model", opts.base_model),
                                                 ("--recovered", opts.recovered))}
        inputs.update({"--adapter": opts.adapter, **{f"--ppl {n}": n for n in opts.ppl}})
        check_output(opts.output, flag="--output", overwrite=opts.overwrite, inputs=inputs)
    if opts.base_model is None:
        if model is not None:
            results = [evaluate_one(opts, model, tokenizer, opts.model, opts.adapter)]
        else:
            results = [_load_and_eval(opts, opts.model, opts.adapter)]
        suite = SuiteResult(results)
    else:
        from gqaprune.evaluate.compare import ModelScores, compare

        original = _load_and_eval(opts, opts.base_model, None, "--base-model")
        pruned = _load_and_eval(opts, opts.model, None)
        recovered = (_load_and_eval(opts, opts.recovered, None, "--recovered") if opts.recovered
                     else _load_and_eval(opts, opts.model, opts.adapter))
        scores = [ModelScores.from_results(lbl, r.ppl, r.tasks or None)
                  for lbl, r in (("original", original), ("pruned", pruned), ("recovered", recovered))]
        suite = SuiteResult([original, pruned, recovered], compare(*scores))
    if opts.output:
        def fill(tmp: Path) -> None:
            (tmp / "eval.json").write_text(json.dumps(suite.to_dict(), indent=2, default=str))
            (tmp / "eval.md").write_text(suite.markdown())

        write_folder(opts.output, "eval", fill, overwrite=opts.overwrite, flag="--output")
    return suite
