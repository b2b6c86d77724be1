"""``gqaprune prune``: load -> calibrate -> score -> plan -> surgery -> save, with a summary."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqaprune import __version__
from gqaprune.data import CALIBRATION_FORMATS
from gqaprune.errors import GQAPruneError
from gqaprune.options import opt
from gqaprune.prune.allocation_search import MOVES as SEARCH_MOVES
from gqaprune.prune.compensate import TARGETS as COMPENSATE_TARGETS
from gqaprune.prune.importance import CRITERIA
from gqaprune.prune.plan import (
    LAYOUTS,
    Budget,
    PrunePlan,
    check_budget,
    finish_plan,
    make_plan,
)
from gqaprune.prune.sensitivity import ALLOCATIONS, SPLITS
from gqaprune.prune.structure import count_params, model_layout

# "obs" lives with the compensation (it scores units by how well the refit can replace them)
ALL_CRITERIA = CRITERIA + ("obs",)

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
    criterion: str = opt("taylor", "importance criterion (obs: the o_proj/down_proj output error when the unit is "
                         "removed and the rest refit, greedy structured OBS on calibration activations)",
                         choices=ALL_CRITERIA)
    layout: str = opt("uniform", "uniform: same counts in every pruned layer (stock LlamaConfig); per-layer: counts "
                      "vary by layer from globally ranked, per-layer-normalised scores", choices=LAYOUTS)
    calibration: str = opt("alpaca", "calibration data: alpaca (yahma/alpaca-cleaned), wikitext2 (train), c4, or a "
                           "local .txt/.json/.jsonl(.gz) file")
    calibration_format: str = opt("prompt", "instruction data (alpaca) as calibration text: prompt = the Alpaca "
                                  "template + response, as fine-tuning sees it; text = instruction, input and "
                                  "output as plain text", choices=CALIBRATION_FORMATS)
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
    compensate: bool = opt(False, "refit the o_proj/down_proj columns of kept units by least squares so each "
                           "pruned layer's output matches the unpruned layer's on the calibration tokens")
    compensate_target: str = opt("layer", "what the refit matches: layer = the unpruned sublayer on the pruned "
                                 "model's inputs; dense = the dense model's own residual stream",
                                 choices=COMPENSATE_TARGETS)
    compensate_ridge: float | None = opt(None, "ridge of the refit (pulls towards the current weights), relative to "
                                         "the mean diagonal of X^T X (default: chosen per layer on the held-out "
                                         "calibration tokens)")
    compensate_holdout: float = opt(0.125, "fraction of calibration samples kept out of the refit to check it; a "
                                    "refit that raises their error is rejected")
    steps: int = opt(1, "iterative pruning: remove the budget in K equal steps, re-scoring (and compensating) "
                     "between steps")
    allocation: str = opt("scores", "per-layer layout: scores = per-layer-normalised scores; sensitivity = also "
                          "weight each layer by its measured calibration-loss rise when pruned alone; search = "
                          "start from sensitivity, then move channels/KV groups between layers while the "
                          "calibration KL from the unpruned model goes down", choices=ALLOCATIONS)
    split: str = opt("balanced", "attention vs MLP: balanced = both lose the same fraction of their units; search = "
                     "try each share of KV groups removed (MLP takes the rest) and keep the plan whose output moves "
                     "least on calibration samples (KL)", choices=SPLITS)
    sensitivity_samples: int = opt(8, "calibration samples used to measure layer sensitivity and to compare "
                                   "splits (--allocation sensitivity, --split search)")
    search_evaluations: int = opt(150, "--allocation search: moves to try (each reruns about half the model on "
                                  "--search-samples samples)")
    search_moves: str = opt("same", "--allocation search: same = channels for channels, KV groups for KV groups; "
                            "mixed = layers may also trade a KV group for the same parameters in MLP channels (and "
                            "back; lowered calibration KL but not WikiText-2 PPL on SmolLM2)", choices=SEARCH_MOVES)
    search_samples: int = opt(8, "--allocation search: calibration samples the KL is measured on (the next as "
                              "many, when there are, check that the result generalises)")


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
    notes: list[str] = field(default_factory=list)  # one line each: compensation, sensitivity, steps

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


def check_options(opts: PruneOptions) -> None:
    """Reject inconsistent options before anything is loaded."""
    if opts.steps < 1:
        raise GQAPruneError(f"--steps {opts.steps}: must be at least 1")
    if opts.allocation not in ALLOCATIONS:
        raise GQAPruneError(f"--allocation {opts.allocation}: choose one of {', '.join(ALLOCATIONS)}")
    if opts.allocation != "scores" and opts.layout != "per-layer" and opts.plan is None:
        raise GQAPruneError(f"--allocation {opts.allocation} sets per-layer budgets: use it with --layout per-layer")
    if opts.split not in SPLITS:
        raise GQAPruneError(f"--split {opts.split}: choose one of {', '.join(SPLITS)}")
    if opts.sensitivity_samples < 1:
        raise GQAPruneError(f"--sensitivity-samples {opts.sensitivity_samples}: must be at least 1")
    if opts.search_evaluations < 1 or opts.search_samples < 1:
        raise GQAPruneError(f"--search-evaluations {opts.search_evaluations} / --search-samples "
                            f"{opts.search_samples}: both must be at least 1")
    if opts.search_moves not in SEARCH_MOVES:
        raise GQAPruneError(f"--search-moves {opts.search_moves}: choose one of {', '.join(SEARCH_MOVES)}")
    if opts.compensate_target not in COMPENSATE_TARGETS:
        raise GQAPruneError(f"--compensate-target {opts.compensate_target}: choose one of "
                            f"{', '.join(COMPENSATE_TARGETS)}")
    if opts.compensate_ridge is not None and opts.compensate_ridge < 0:
        raise GQAPruneError(f"--compensate-ridge {opts.compensate_ridge}: must be >= 0")
    if not 0 <= opts.compensate_holdout < 1:
        raise GQAPruneError(f"--compensate-holdout {opts.compensate_holdout}: must be in [0, 1)")
    if opts.plan is not None and (opts.steps > 1 or opts.allocation != "scores" or opts.split != "balanced"):
        raise GQAPruneError("--plan replays a saved plan: --steps, --allocation and --split only apply when scoring")


def needs_calibration(opts: PruneOptions) -> bool:
    if opts.plan is not None:
        return opts.compensate
    return opts.criterion not in ("magnitude", "random") or opts.compensate or opts.allocation != "scores" \
        or opts.split == "search"


def score_model(model, layout, opts: PruneOptions, ids, *, seed: int, progress: bool = True) -> list[dict]:
    """One score per unit for every layer, for any ``--criterion`` (obs included)."""
    if opts.criterion == "obs":
        from gqaprune.prune.compensate import obs_scores

        return obs_scores(model, layout, ids, batch_size=opts.calib_batch_size, progress=progress)
    from gqaprune.prune.calibrate import score_units

    return score_units(model, layout, opts.criterion, ids, seed=seed, batch_size=opts.calib_batch_size,
                       use_hooks=not opts.no_hooks, progress=progress)


def _compensate(model, plan, ids, opts, progress):
    from gqaprune.prune.compensate import compensate

    return compensate(model, plan, ids, target=opts.compensate_target, ridge=opts.compensate_ridge,
                      holdout=opts.compensate_holdout, batch_size=opts.calib_batch_size, progress=progress)


def prune_model(model, opts: PruneOptions, ids: torch.Tensor | None, *, scores: list[dict] | None = None,
                sensitivity: dict | None = None, provenance: dict | None = None, progress: bool = True):
    """Score, plan and cut ``model`` (in place; returns (pruned model, plan)).

    ``scores`` / ``sensitivity``: precomputed for ``model`` (to reuse across runs); computed when None.
    With ``opts.steps = K > 1`` the budget is removed in K equal steps, re-scoring the partly
    pruned model each time; every step's indices are mapped back through the earlier steps,
    so the returned plan refers to the ORIGINAL model's units and replays on it (its weights,
    with --compensate, were refit step by step; replaying with --compensate refits once).
    """
    from gqaprune.prune.surgery import apply_plan

    check_options(opts)
    layout0 = model_layout(model)
    budget = Budget(opts.pruning_ratio, opts.target_params)
    removed, pruned_layers = check_budget(layout0, budget, opts.keep_first, opts.keep_last, opts.min_mlp)
    if needs_calibration(opts) and ids is None:
        raise GQAPruneError("internal: calibration ids are needed for these options")
    prov = dict(provenance or {})
    prov.update({"steps": opts.steps, "allocation": opts.allocation if opts.layout == "per-layer" else None,
                 "split": opts.split})
    weights = None
    if opts.allocation in ("sensitivity", "search"):
        from gqaprune.prune.sensitivity import layer_sensitivity

        if sensitivity is None:
            sc0 = scores if scores is not None else score_model(model, layout0, opts, ids, seed=opts.seed,
                                                                progress=progress)
            scores = sc0
            sensitivity = layer_sensitivity(model, layout0, sc0, ids[: opts.sensitivity_samples], removed,
                                            pruned_layers, min_mlp=opts.min_mlp, round_mlp_to=opts.round_mlp_to,
                                            batch_size=opts.calib_batch_size, progress=progress)
        weights = {x["layer"]: x["weight"] for x in sensitivity["layers"]}
        prov["sensitivity"] = sensitivity
    comp_reports, step_log, split_reports, search_reports = [], [], [], []
    kv_orig = [list(range(s.n_kv)) for s in layout0.layers]     # current unit j of layer i = original kv_orig[i][j]
    mlp_orig = [list(range(s.n_mlp)) for s in layout0.layers]
    cur = model
    for k in range(1, opts.steps + 1):
        lay = model_layout(cur)
        keep_k = layout0.total_params - round(removed * k / opts.steps)   # cumulative, in original terms
        if opts.steps > 1 and lay.total_params - keep_k < min(lay.group_params, lay.channel_params):
            step_log.append({"step": k, "skipped": "nothing left to remove at this step's share"})
            continue
        sc = scores if (k == 1 and scores is not None) else score_model(cur, lay, opts, ids, seed=opts.seed + k - 1,
                                                                        progress=progress)
        step_budget = budget if opts.steps == 1 else Budget(target_params=keep_k)

        def make(kv_fraction=None, lay=lay, sc=sc, step_budget=step_budget):
            return make_plan(lay, sc, step_budget, layout_kind=opts.layout, keep_first=opts.keep_first,
                             keep_last=opts.keep_last, min_mlp=opts.min_mlp, round_mlp_to=opts.round_mlp_to,
                             provenance=prov, layer_weights=weights, kv_fraction=kv_fraction)

        if opts.split == "search":
            from gqaprune.prune.sensitivity import search_split

            plan_k, srep = search_split(cur, lay, make, ids[: opts.sensitivity_samples],
                                        batch_size=opts.calib_batch_size)
            srep["step"] = k
            split_reports.append(srep)
        else:
            plan_k = make()
        if opts.allocation == "search":
            from gqaprune.prune.allocation_search import search_allocation

            plan_k, arep = search_allocation(cur, lay, sc, plan_k, ids, evaluations=opts.search_evaluations,
                                             samples=opts.search_samples, batch_size=opts.calib_batch_size,
                                             min_mlp=opts.min_mlp, round_mlp_to=opts.round_mlp_to,
                                             seed=opts.seed + k - 1, moves=opts.search_moves, progress=progress)
            arep["step"] = k
            search_reports.append(arep)
        if opts.compensate:
            rep = _compensate(cur, plan_k, ids, opts, progress)
            rep["step"] = k
            comp_reports.append(rep)
        cur = apply_plan(cur, plan_k)
        kv_orig = [[o[j] for j in keep] for o, keep in zip(kv_orig, plan_k.kv_groups)]
        mlp_orig = [[o[j] for j in keep] for o, keep in zip(mlp_orig, plan_k.mlp_channels)]
        step_log.append({"step": k, "params_after": plan_k.provenance["params_after"],
                         "kv_per_layer": plan_k.kept_kv, "mlp_per_layer": plan_k.kept_mlp})
        log.info("step %d/%d: %d parameters", k, opts.steps, plan_k.provenance["params_after"])
    if opts.steps > 1:
        prov["step_log"] = step_log
    if comp_reports:
        prov["compensation"] = comp_reports
    if split_reports:
        prov["split_search"] = split_reports
    if search_reports:
        prov["allocation_search"] = search_reports
    plan = finish_plan(layout0, kv_orig, mlp_orig, budget, removed, pruned_layers, layout_kind=opts.layout,
                       min_mlp=opts.min_mlp, round_mlp_to=opts.round_mlp_to, provenance=prov)
    return cur, plan


def notes_for(plan: PrunePlan) -> list[str]:
    """One line each for what the plain summary does not show: compensation, sensitivity, steps."""
    from gqaprune.prune import allocation_search, compensate, sensitivity

    prov, out = plan.provenance, []
    if prov.get("steps", 1) > 1:
        sizes = [f"{x['params_after']:,}" for x in prov.get("step_log", []) if "params_after" in x]
        out.append(f"iterative: {prov['steps']} steps, re-scored between steps; parameters after each: "
                   + " -> ".join(sizes))
    if prov.get("sensitivity"):
        out.append(sensitivity.summary_line(prov["sensitivity"]))
    for rep in prov.get("split_search", []):
        step = f"step {rep['step']}: " if prov.get("steps", 1) > 1 else ""
        cands = ", ".join(f"{c['kv_fraction']:.0%} -> {c['kl']:.4f}" for c in rep["candidates"] if "kl" in c)
        out.append(f"{step}split search (share of KV groups removed -> KL per token on {rep['tokens']:,} calibration "
                   f"tokens): {cands}; chose {rep['chosen_kv_fraction']:.0%}")
    for rep in prov.get("allocation_search", []):
        step = f"step {rep['step']}: " if prov.get("steps", 1) > 1 else ""
        out.append(step + allocation_search.summary_line(rep))
    for rep in prov.get("compensation", []):
        step = f"step {rep['step']}: " if prov.get("steps", 1) > 1 else ""
        out.append(step + compensate.summary_line(rep))
    return out


def prune(opts: PruneOptions) -> PruneResult:
    """Prune ``opts.model`` to the budget and save a loadable checkpoint with its plan."""
    from gqaprune.model_io import load_model, save_checkpoint
    from gqaprune.prune.calibrate import calibration_batch
    from gqaprune.prune.surgery import apply_plan
    from gqaprune.report import kept_units_png

    t0 = time.perf_counter()
    if opts.output and Path(opts.output).exists() and not opts.overwrite:
        raise GQAPruneError(f"--output {opts.output}: the folder exists; choose another folder or pass --overwrite")
    check_options(opts)
    if opts.plan is None:
        Budget(opts.pruning_ratio, opts.target_params).removed(10**12 if opts.target_params is None
                                                              else opts.target_params + 1)  # validate early
    if needs_calibration(opts) and opts.seq_len < 2:
        raise GQAPruneError(f"--seq-len {opts.seq_len}: must be at least 2 tokens")
    plan = PrunePlan.load(opts.plan) if opts.plan else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    model, tok = load_model(opts.model, dtype=opts.dtype, device=opts.device, allow_pickle=opts.allow_pickle)
    layout = model_layout(model)
    ppl_before = _ppl_all(model, tok, opts.eval_ppl, opts)

    calib_desc, ids = None, None
    if plan is None:
        check_budget(layout, Budget(opts.pruning_ratio, opts.target_params), opts.keep_first, opts.keep_last,
                     opts.min_mlp)
    else:
        plan.check_matches(layout, f"--model {opts.model}")
    if needs_calibration(opts):
        ids, calib_desc = calibration_batch(tok, opts.calibration, opts.num_samples, opts.seq_len, opts.seed,
                                            fmt=opts.calibration_format)
    params_before = count_params(model)
    if plan is None:
        prov = {"source_model": opts.model, "criterion": opts.criterion, "calibration": calib_desc,
                "calibration_tokens": None if ids is None else int(ids.numel()), "seed": opts.seed,
                "gqaprune_version": __version__}
        pruned, plan = prune_model(model, opts, ids, provenance=prov)
    else:
        plan.provenance.setdefault("applied_from", opts.plan)
        if opts.compensate:
            rep = _compensate(model, plan, ids, opts, progress=True)
            rep["step"] = 1
            plan.provenance["compensation"] = [rep]
            plan.provenance["compensation_calibration"] = calib_desc
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
        notes=notes_for(plan),
    )
    plan.provenance.update({"ppl_before": ppl_before, "ppl_after": ppl_after, "wall_s": round(wall, 2),
                            "peak_rss_mb": round(res.peak_rss_mb, 1), "peak_gpu_mb": res.peak_gpu_mb})
    if opts.output:
        import json

        res.chart = str(Path(opts.output) / "kept_units.png")
        save_checkpoint(pruned, tok, opts.output, plan=None, overwrite=opts.overwrite,
                        extra_files={"prune_plan.json": plan.to_json(),
                                     "prune_summary.json": json.dumps(res.to_dict(), indent=2, default=str),
                                     "kept_units.png": kept_units_png(plan, f"{opts.model} -> {Path(opts.output).name}")})
    res.model = pruned  # type: ignore[attr-defined]  # for callers that keep working in memory
    res.tokenizer = tok  # type: ignore[attr-defined]
    return res
