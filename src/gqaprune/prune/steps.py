"""``prune_model``: score, plan and cut a loaded model, in one step or K iterative steps.

One step: scores (score/) -> per-layer weights (allocate/sensitivity.py, when asked) -> a plan
from the budget (plan.py; ``--split search`` tries the attention/MLP shares) -> the allocation
search (allocate/search.py, when asked) -> compensation (compensate.py, when asked) -> surgery.
With ``steps = K > 1`` the budget is removed in K equal steps, re-scoring the partly pruned
model each time; every step's indices are mapped back through the earlier steps, so the
returned plan refers to the ORIGINAL model's units and replays on it (its weights, with
--compensate, were refit step by step; replaying with --compensate refits once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import ModelLayout, model_layout
from gqaprune.prune.budget import Budget, Target
from gqaprune.prune.plan import PER_LAYER, PrunePlan, finish_plan, make_plan
from gqaprune.prune.score import score_units
from gqaprune.prune.surgery import apply_plan

log = logging.getLogger(__name__)


def score_model(model, layout: ModelLayout, opts, ids, *, seed: int, progress: bool = True) -> list[dict]:
    """One score per unit for every layer, for ``opts.criterion`` (any registered criterion)."""
    return score_units(model, layout, opts.criterion, ids, seed=seed, batch_size=opts.calib_batch_size,
                       hooks=opts.hooks, progress=progress)


def compensate_plan(model, plan: PrunePlan, ids, opts, progress: bool) -> dict:
    """Refit ``model`` in place for ``plan`` (``--compensate``); returns the report."""
    from gqaprune.prune.compensate import compensate

    return compensate(model, plan, ids, target=opts.compensate_target, ridge=opts.compensate_ridge,
                      holdout=opts.compensate_holdout, batch_size=opts.calib_batch_size, progress=progress)


@dataclass
class _Reports:
    """What each step leaves in the plan's provenance."""

    steps: list = field(default_factory=list)
    compensation: list = field(default_factory=list)
    split_search: list = field(default_factory=list)
    allocation_search: list = field(default_factory=list)

    def into(self, prov: dict, n_steps: int) -> None:
        if n_steps > 1:
            prov["step_log"] = self.steps
        for key in ("compensation", "split_search", "allocation_search"):
            if getattr(self, key):
                prov[key] = getattr(self, key)


def _layer_weights(model, layout, opts, ids, target: Target, scores, sensitivity, progress):
    """(sensitivity report, layer -> weight, scores) for --allocation sensitivity/search; scores are computed
    here when the sensitivity needs them. (None, None, scores) for other allocations."""
    if opts.allocation not in ("sensitivity", "search"):
        return None, None, scores
    from gqaprune.prune.allocate.sensitivity import layer_sensitivity

    if sensitivity is None:
        scores = scores if scores is not None else score_model(model, layout, opts, ids, seed=opts.seed,
                                                               progress=progress)
        sensitivity = layer_sensitivity(model, layout, scores, ids[: opts.sensitivity_samples], target.removed,
                                        list(target.pruned), min_mlp=opts.min_mlp, round_mlp_to=opts.round_mlp_to,
                                        batch_size=opts.calib_batch_size, progress=progress)
    return sensitivity, {x["layer"]: x["weight"] for x in sensitivity["layers"]}, scores


def _plan_step(cur, lay, sc, target: Target, opts, ids, weights, prov, k: int, rep: _Reports, progress) -> PrunePlan:
    """The plan of one step: budget split (or split search), then the allocation search."""
    def make(kv_fraction=None):
        return make_plan(lay, sc, target, layout_kind=opts.layout, round_mlp_to=opts.round_mlp_to,
                         provenance=prov, layer_weights=weights, kv_fraction=kv_fraction)

    if opts.split == "search":
        from gqaprune.prune.allocate.split import search_split

        plan, srep = search_split(cur, lay, make, ids[: opts.sensitivity_samples], batch_size=opts.calib_batch_size)
        rep.split_search.append(srep | {"step": k})
    else:
        plan = make()
    if opts.allocation == "search":
        from gqaprune.prune.allocate.search import search_allocation

        plan, arep = search_allocation(cur, lay, sc, plan, ids, target, evaluations=opts.search_evaluations,
                                       samples=opts.search_samples, batch_size=opts.calib_batch_size,
                                       round_mlp_to=opts.round_mlp_to, seed=opts.seed + k - 1,
                                       moves=opts.search_moves, screen=opts.search_screen_samples,
                                       progress=progress)
        rep.allocation_search.append(arep | {"step": k})
    return plan


def prune_model(model, opts, ids: torch.Tensor | None, *, scores: list[dict] | None = None,
                sensitivity: dict | None = None, provenance: dict | None = None, target: Target | None = None,
                progress: bool = True):
    """Score, plan and cut ``model`` (in place; returns (pruned model, plan)); see the module doc.

    ``opts``: PruneOptions. ``scores`` / ``sensitivity``: precomputed for ``model`` (to reuse
    across runs); computed when None. ``target``: the budget already resolved for ``model``.
    """
    layout0 = model_layout(model)
    if target is None:
        target = opts.budget().resolve(layout0, opts.keep_first, opts.keep_last, opts.min_mlp)
    if ids is None and opts.needs_calibration():
        raise GQAPruneError("internal: calibration ids are needed for these options")
    prov = dict(provenance or {})
    prov.update({"steps": opts.steps, "allocation": opts.allocation if opts.layout in PER_LAYER else None,
                 "split": opts.split})
    sens, weights, scores = _layer_weights(model, layout0, opts, ids, target, scores, sensitivity, progress)
    if sens is not None:
        prov["sensitivity"] = sens
    rep = _Reports()
    kv_orig = [list(range(s.n_kv)) for s in layout0.layers]     # current unit j of layer i = original kv_orig[i][j]
    mlp_orig = [list(range(s.n_mlp)) for s in layout0.layers]
    cur = model
    for k in range(1, opts.steps + 1):
        lay = model_layout(cur)
        keep_k = layout0.total_params - round(target.removed * k / opts.steps)   # cumulative, in original terms
        if opts.steps > 1 and lay.total_params - keep_k < min(lay.group_params, lay.channel_params):
            rep.steps.append({"step": k, "skipped": "nothing left to remove at this step's share"})
            continue
        sc = scores if (k == 1 and scores is not None) else score_model(cur, lay, opts, ids, seed=opts.seed + k - 1,
                                                                        progress=progress)
        step_target = target if opts.steps == 1 else \
            Budget(target_params=keep_k).resolve(lay, opts.keep_first, opts.keep_last, opts.min_mlp)
        plan_k = _plan_step(cur, lay, sc, step_target, opts, ids, weights, prov, k, rep, progress)
        if opts.compensate:
            rep.compensation.append(compensate_plan(cur, plan_k, ids, opts, progress) | {"step": k})
        cur = apply_plan(cur, plan_k)
        kv_orig = [[o[j] for j in keep] for o, keep in zip(kv_orig, plan_k.kv_groups)]
        mlp_orig = [[o[j] for j in keep] for o, keep in zip(mlp_orig, plan_k.mlp_channels)]
        rep.steps.append({"step": k, "params_after": plan_k.provenance["params_after"],
                          "kv_per_layer": plan_k.kept_kv, "mlp_per_layer": plan_k.kept_mlp})
        log.info("step %d/%d: %d parameters", k, opts.steps, plan_k.provenance["params_after"])
    rep.into(prov, opts.steps)
    plan = finish_plan(layout0, kv_orig, mlp_orig, target, layout_kind=opts.layout, round_mlp_to=opts.round_mlp_to,
                       provenance=prov)
    return cur, plan


def notes_for(plan: PrunePlan) -> list[str]:
    """One line each for what the plain summary does not show: compensation, sensitivity, steps."""
    from gqaprune.prune import compensate
    from gqaprune.prune.allocate import search, sensitivity

    prov, out = plan.provenance, []
    multi = prov.get("steps", 1) > 1
    if prov.get("round_mlp_to") and prov["round_mlp_to"] > 1 and "params_vs_target" in prov:
        d = prov["params_vs_target"]
        out.append(f"MLP widths are multiples of {prov['round_mlp_to']}: {abs(d):,} parameters "
                   f"{'more' if d >= 0 else 'fewer'} kept than the target ({d / prov['params_before']:+.2%} of the "
                   "model)")
    if multi:
        sizes = [f"{x['params_after']:,}" for x in prov.get("step_log", []) if "params_after" in x]
        out.append(f"iterative: {prov['steps']} steps, re-scored between steps; parameters after each: "
                   + " -> ".join(sizes))
    if prov.get("sensitivity"):
        out.append(sensitivity.summary_line(prov["sensitivity"]))
    for rep in prov.get("split_search", []):
        cands = ", ".join(f"{c['kv_fraction']:.0%} -> {c['kl']:.4f}" for c in rep["candidates"] if "kl" in c)
        out.append((f"step {rep['step']}: " if multi else "") + f"split search (share of KV groups removed -> KL per "
                   f"token on {rep['tokens']:,} calibration tokens): {cands}; chose {rep['chosen_kv_fraction']:.0%}")
    for rep in prov.get("allocation_search", []):
        out.append((f"step {rep['step']}: " if multi else "") + search.summary_line(rep))
    for rep in prov.get("compensation", []):
        out.append((f"step {rep['step']}: " if multi else "") + compensate.summary_line(rep))
    if prov.get("reconstruction"):
        from gqaprune.prune.reconstruct import summary_line

        out.append(summary_line(prov["reconstruction"]))
    return out
