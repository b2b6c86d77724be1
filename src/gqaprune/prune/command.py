"""``gqaprune prune``: check -> load -> calibrate -> score, plan, cut (steps.py) -> save, with a summary.

``prune(opts)`` is a short function that calls its phases by name; each phase is below it.
Everything that can be checked without the model is checked before it is loaded; the
budget or plan is checked against the model right after loading, before any perplexity
or calibration pass.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gqaprune import __version__
from gqaprune.data.calibration import calibration_batch, check_source
from gqaprune.data.corpora import check_corpus
from gqaprune.errors import GQAPruneError
from gqaprune.memory import peak_gpu_mb, peak_rss_mb, reset_gpu_peak
from gqaprune.models.io import is_per_layer, load_model, local_path, resolve_model_ref, save_checkpoint
from gqaprune.models.family import family_of
from gqaprune.models.layout import count_params, model_layout
from gqaprune.outputs import check_output
from gqaprune.prune.budget import Target
from gqaprune.prune.options import PruneOptions
from gqaprune.prune.plan import PrunePlan
from gqaprune.prune.compensate import check_target
from gqaprune.prune.steps import compensate_plan, notes_for, prune_model
from gqaprune.prune.surgery import apply_plan, check_layout_family

log = logging.getLogger(__name__)

__all__ = ["PruneOptions", "PruneResult", "prune", "prune_model"]


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


def layer_table(model) -> list[dict]:
    lay = model_layout(model)
    return [{"layer": i, "q_heads": s.n_kv * lay.q_per_kv, "kv_heads": s.n_kv, "mlp": s.n_mlp,
             "q_per_kv": lay.q_per_kv} for i, s in enumerate(lay.layers)]


# ------------------------------------------------------------------------------------------ phases
def check_inputs(opts: PruneOptions) -> PrunePlan | None:
    """Every input that can be checked without the model: names, paths, the plan file, the output."""
    if opts.output is None and not opts.dry_run:
        raise GQAPruneError("prune: give --output DIR (where the pruned checkpoint goes), or --dry-run to only "
                            "print the summary")
    resolve_model_ref(opts.model, "--model")
    plan = PrunePlan.load(opts.plan) if opts.plan else None
    if plan is None:
        opts.budget()   # one of --pruning-ratio / --target-params / --plan is required
    if opts.needs_calibration():
        check_source(opts.calibration, "--calibration")
    for name in opts.eval_ppl:
        check_corpus(name, "test", "--eval-ppl")
    if opts.output:
        files = {"--model": local_path(opts.model), "--plan": opts.plan, "--calibration": opts.calibration}
        files.update({f"--eval-ppl {n}": n for n in opts.eval_ppl})
        check_output(opts.output, flag="--output", overwrite=opts.overwrite, inputs=files)
    return plan


def check_against_model(model, opts: PruneOptions, plan: PrunePlan | None) -> Target | None:
    """The budget resolved for the loaded model (or the plan checked against it), before any calibration or
    perplexity."""
    layout = model_layout(model)
    fam = family_of(model)
    check_layout_family(opts.layout, fam)
    if opts.compensate:
        check_target(fam, opts.compensate_target)
    if plan is not None:
        plan.check_claims(layout, f"--model {opts.model}")
        return None
    return opts.budget().resolve(layout, opts.keep_first, opts.keep_last, opts.min_mlp)


def measure_ppl(model, tok, opts: PruneOptions) -> list[dict]:
    from gqaprune.evaluate.perplexity import perplexity

    return [perplexity(model, tok, n, seq_len=opts.ppl_seq_len, max_tokens=opts.ppl_max_tokens).to_dict()
            for n in opts.eval_ppl]


def calibrate(opts: PruneOptions, tok):
    """(calibration ids (samples x tokens), their description), or (None, None) when nothing needs them."""
    if not opts.needs_calibration():
        return None, None
    return calibration_batch(tok, opts.calibration, opts.num_samples, opts.seq_len, opts.seed,
                             fmt=opts.calibration_format)


def cut(model, opts: PruneOptions, plan: PrunePlan | None, target: Target | None, ids, calib_desc: str | None,
        progress: bool = True):
    """(pruned model, plan): score and plan (steps.py), or replay ``plan`` (refit first with --compensate)."""
    if plan is None:
        prov = {"source_model": opts.model, "criterion": opts.criterion, "calibration": calib_desc,
                "calibration_tokens": None if ids is None else int(ids.numel()), "seed": opts.seed,
                "recipe": opts.recipe_record, "gqaprune_version": __version__}
        return prune_model(model, opts, ids, provenance=prov, target=target, progress=progress)
    plan.provenance.setdefault("applied_from", opts.plan)
    if opts.compensate:
        plan.provenance["compensation"] = [compensate_plan(model, plan, ids, opts, progress) | {"step": 1}]
        plan.provenance["compensation_calibration"] = calib_desc
    return apply_plan(model, plan), plan


def reconstruct_layers(pruned, opts: PruneOptions, ids, progress: bool = True) -> dict:
    """--reconstruct-epochs: train the pruned layers towards a fresh copy of the dense model's (prune/reconstruct.py)."""
    from gqaprune.prune.reconstruct import reconstruct

    dense, _ = load_model(opts.model, dtype=opts.dtype, device=opts.device, allow_pickle=opts.allow_pickle,
                          with_tokenizer=False)
    try:
        return reconstruct(pruned, dense, ids, epochs=opts.reconstruct_epochs, lr=opts.reconstruct_lr,
                           holdout=opts.compensate_holdout, batch_size=opts.calib_batch_size, progress=progress)
    finally:
        del dense


def save(res: PruneResult, opts: PruneOptions, pruned, tok) -> None:
    from gqaprune.models.card import model_card
    from gqaprune.options import command_line
    from gqaprune.report import kept_units_png

    name = Path(opts.output).name
    res.chart = str(Path(opts.output) / "kept_units.png")
    card = model_card(json.loads(res.plan.to_json()), folder_name=name, command=command_line("gqaprune prune", opts),
                      per_layer=is_per_layer(pruned), ppl_before=res.ppl_before, ppl_after=res.ppl_after)
    save_checkpoint(pruned, tok, opts.output, overwrite=opts.overwrite, kind="prune", flag="--output",
                    extra_files={"prune_plan.json": res.plan.to_json(),
                                 "prune_summary.json": json.dumps(res.to_dict(), indent=2, default=str),
                                 "kept_units.png": kept_units_png(res.plan, f"{opts.model} -> {name}"),
                                 "README.md": card})


# ------------------------------------------------------------------------------------------ the command
def prune(opts: PruneOptions) -> PruneResult:
    """Prune ``opts.model`` to the budget and save a loadable checkpoint with its plan."""
    t0 = time.perf_counter()
    plan = check_inputs(opts)
    reset_gpu_peak()
    model, tok = load_model(opts.model, dtype=opts.dtype, device=opts.device, allow_pickle=opts.allow_pickle)
    target = check_against_model(model, opts, plan)
    ppl_before = measure_ppl(model, tok, opts)
    ids, calib_desc = calibrate(opts, tok)
    params_before = count_params(model)
    pruned, plan = cut(model, opts, plan, target, ids, calib_desc)
    del model
    if opts.reconstruct_epochs:
        plan.provenance["reconstruction"] = reconstruct_layers(pruned, opts, ids)
    params_after = count_params(pruned)
    if params_after != plan.provenance.get("params_after", params_after):
        raise RuntimeError(f"internal: plan predicted {plan.provenance['params_after']} params, got {params_after}")
    ppl_after = measure_ppl(pruned, tok, opts)
    wall = time.perf_counter() - t0
    res = PruneResult(output=opts.output, plan=plan, params_before=params_before, params_after=params_after,
                      layers=layer_table(pruned), ppl_before=ppl_before, ppl_after=ppl_after, wall_s=wall,
                      peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(), notes=notes_for(plan))
    plan.provenance.update({"ppl_before": ppl_before, "ppl_after": ppl_after, "wall_s": round(wall, 2),
                            "peak_rss_mb": round(res.peak_rss_mb, 1), "peak_gpu_mb": res.peak_gpu_mb})
    if opts.output:
        save(res, opts, pruned, tok)
    res.model = pruned  # type: ignore[attr-defined]  # for callers that keep working in memory
    res.tokenizer = tok  # type: ignore[attr-defined]
    return res
