"""``gqaprune prune``: load -> calibrate -> score -> plan -> surgery -> save, with a summary."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqaprune import __version__
from gqaprune.errors import GQAPruneError
from gqaprune.options import opt
from gqaprune.prune.importance import CRITERIA
from gqaprune.prune.plan import LAYOUTS, Budget, PrunePlan, check_budget, make_plan
from gqaprune.prune.structure import count_params, model_layout

log = logging.getLogger(__name__)


@dataclass
class PruneOptions:
    model: str = opt("smollm2-135m", "model to prune: HF folder, Hub id, .gguf file, alias smollm2-135m, or legacy "
                     "pytorch_model.bin (with --allow-pickle)")
    output: str | None = opt(None, "output checkpoint folder (Hugging Face layout)", aliases=("-o",))
    pruning_ratio: float | None = opt(None, "fraction of the model's TOTAL parameters to remove (tied embeddings "
                                      "counted once). Not LLM-Pruner's --pruning_ratio, which is the fraction of "
                                      "heads/channels removed inside each pruned layer and removes far less overall")
    target_params: int | None = opt(None, "alternative to --pruning-ratio: parameters to keep")
    criterion: str = opt("taylor", "importance criterion", choices=CRITERIA)
    layout: str = opt("uniform", "uniform: same counts in every pruned layer (stock LlamaConfig); per-layer: counts "
                      "vary by layer from globally ranked, per-layer-normalised scores", choices=LAYOUTS)
    calibration: str = opt("alpaca", "calibration data: alpaca (yahma/alpaca-cleaned), wikitext2 (train), c4, or a "
                           "local .txt/.json/.jsonl(.gz) file")
    num_samples: int = opt(64, "calibration samples")
    seq_len: int = opt(128, "tokens per calibration sample")
    calib_batch_size: int = opt(8, "samples per calibration forward/backward; gradient scores are summed per batch")
    seed: int = opt(0, "seed for the calibration sample and the random criterion")
    keep_first: int = opt(0, "leave the first K layers unpruned (LLM-Pruner's default protects 4)")
    keep_last: int = opt(0, "leave the last K layers unpruned (LLM-Pruner's default protects 2)")
    min_mlp: int = opt(1, "every layer keeps at least this many MLP channels")
    round_mlp_to: int | None = opt(None, "keep a multiple of M MLP channels per layer (hardware-friendly widths)")
    plan: str | None = opt(None, "apply this saved plan.json to the model instead of scoring")
    eval_ppl: list[str] = opt(factory=list, help="datasets to measure perplexity on before and after, e.g. wikitext2")
    ppl_seq_len: int = opt(128, "perplexity window length (tokens)")
    ppl_max_tokens: int | None = opt(None, "score only the first N tokens of each PPL dataset (quick runs)")
    dtype: str | None = opt(None, "fp32, bf16 or fp16 (default: bf16 on GPUs that support it, else fp32)")
    device: str | None = opt(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    allow_pickle: bool = opt(False, "allow loading a legacy pickled model (runs code from the file)")
    overwrite: bool = opt(False, "replace the output folder if it exists")
    no_hooks: bool = opt(False, "score from .grad after each backward instead of per-parameter hooks "
                         "(more memory; same scores)")


@dataclass
class PruneResult:
    output: str | None
    plan: PrunePlan
    params_before: int
    params_after: int
    layers: list[dict]                   # per layer: q heads, kv heads, mlp, q:kv
    ppl_before: list[dict] = field(default_factory=list)
    ppl_after: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    chart: str | None = None

    @property
    def reduction(self) -> float:
        return 1 - self.params_after / self.params_before

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = None
        d["reduction"] = self.reduction
        return d


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layer_table(model) -> list[dict]:
    lay = model_layout(model)
    return [{"layer": i, "q_heads": s.n_kv * lay.q_per_kv, "kv_heads": s.n_kv, "mlp": s.n_mlp,
             "q_per_kv": lay.q_per_kv} for i, s in enumerate(lay.layers)]


def _ppl_all(model, tok, names, opts) -> list[dict]:
    from gqaprune.evaluate.perplexity import perplexity

    return [perplexity(model, tok, n, seq_len=opts.ppl_seq_len, max_tokens=opts.ppl_max_tokens).to_dict()
            for n in names]


def prune(opts: PruneOptions) -> PruneResult:
    """Prune ``opts.model`` to the budget and save a loadable checkpoint with its plan."""
    from gqaprune.model_io import load_model, save_checkpoint
    from gqaprune.prune.calibrate import calibration_batch, score_units
    from gqaprune.prune.surgery import apply_plan
    from gqaprune.report import kept_units_png

    t0 = time.perf_counter()
    if opts.output and Path(opts.output).exists() and not opts.overwrite:
        raise GQAPruneError(f"--output {opts.output}: the folder exists; choose another folder or pass --overwrite")
    if opts.plan is None:
        Budget(opts.pruning_ratio, opts.target_params).removed(10**12 if opts.target_params is None
                                                              else opts.target_params + 1)  # validate early
        if opts.seq_len < 2:
            raise GQAPruneError(f"--seq-len {opts.seq_len}: must be at least 2 tokens")
    plan = PrunePlan.load(opts.plan) if opts.plan else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    model, tok = load_model(opts.model, dtype=opts.dtype, device=opts.device, allow_pickle=opts.allow_pickle)
    layout = model_layout(model)
    ppl_before = _ppl_all(model, tok, opts.eval_ppl, opts)

    calib_desc = None
    if plan is None:
        check_budget(layout, Budget(opts.pruning_ratio, opts.target_params), opts.keep_first, opts.keep_last,
                     opts.min_mlp)
        needs_data = opts.criterion not in ("magnitude", "random")
        ids = None
        if needs_data:
            ids, calib_desc = calibration_batch(tok, opts.calibration, opts.num_samples, opts.seq_len, opts.seed)
        scores = score_units(model, layout, opts.criterion, ids, seed=opts.seed, batch_size=opts.calib_batch_size,
                             use_hooks=not opts.no_hooks)
        prov = {"source_model": opts.model, "criterion": opts.criterion, "calibration": calib_desc,
                "calibration_tokens": None if ids is None else int(ids.numel()), "seed": opts.seed,
                "gqaprune_version": __version__}
        plan = make_plan(layout, scores, Budget(opts.pruning_ratio, opts.target_params), layout_kind=opts.layout,
                         keep_first=opts.keep_first, keep_last=opts.keep_last, min_mlp=opts.min_mlp,
                         round_mlp_to=opts.round_mlp_to, provenance=prov)
    else:
        plan.check_matches(layout, f"--model {opts.model}")
        plan.provenance.setdefault("applied_from", opts.plan)

    params_before = count_params(model)
    pruned = apply_plan(model, plan)
    del model
    params_after = count_params(pruned)
    if params_after != plan.provenance.get("params_after", params_after):
        raise RuntimeError(f"internal: plan predicted {plan.provenance['params_after']} params, got {params_after}")
    ppl_after = _ppl_all(pruned, tok, opts.eval_ppl, opts)
    wall = time.perf_counter() - t0
    res = PruneResult(
        output=opts.output, plan=plan, params_before=params_before, params_after=params_after,
        layers=layer_table(pruned), ppl_before=ppl_before, ppl_after=ppl_after, wall_s=wall,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    )
    plan.provenance.update({"ppl_before": ppl_before, "ppl_after": ppl_after, "wall_s": round(wall, 2),
                            "peak_rss_mb": round(res.peak_rss_mb, 1), "peak_gpu_mb": res.peak_gpu_mb})
    if opts.output:
        import json

        res.chart = str(Path(opts.output) / "kept_units.png")
        out = save_checkpoint(pruned, tok, opts.output, plan=None, overwrite=opts.overwrite,
                              extra_files={"prune_plan.json": plan.to_json(),
                                           "prune_summary.json": json.dumps(res.to_dict(), indent=2, default=str),
                                           "kept_units.png": kept_units_png(plan, f"{opts.model} -> {Path(opts.output).name}")})
    res.model = pruned  # type: ignore[attr-defined]  # for callers that keep working in memory
    res.tokenizer = tok  # type: ignore[attr-defined]
    return res
