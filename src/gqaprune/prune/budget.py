"""The parameter budget: how many parameters to remove, and how many units each layer loses.

``--pruning-ratio R`` removes the fraction R of the model's *total* parameters
(embeddings and lm_head included, tied weights counted once). LLM-Pruner's
``--pruning_ratio`` is instead the fraction of heads/channels removed inside each
pruned layer, so the same number removes much less of the whole model there.

A ``Budget`` checks itself when it is created; ``Budget.resolve(layout, ...)`` checks it
against a model once and returns a ``Target`` (parameters to remove, the layers that may
lose units). Everything after that receives the resolved counts.

How the budget is split. Attention (KV groups) and MLP (channels) give up the same
fraction of their units as nearly as the KV-group granularity allows; the MLP count
then absorbs the remainder so the achieved total is the nearest one the unit sizes allow.
``uniform``: every pruned layer loses the same counts (``solve_counts``). ``per-layer``:
the same totals, but which layer gives up which unit is decided by ranking units across
layers with scores normalised per layer (score / layer mean); with sensitivity weights
(``--allocation sensitivity``) each layer's count is instead proportional to its size /
its weight, and the scores pick the units within the layer (``per_layer_counts``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import ModelLayout


@dataclass(frozen=True)
class Budget:
    """What to remove: exactly one of ``ratio`` (of total params) or ``target_params`` (params to keep)."""

    ratio: float | None = None
    target_params: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.target_params is None):
            raise GQAPruneError("give exactly one of --pruning-ratio and --target-params")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise GQAPruneError(f"--pruning-ratio {self.ratio}: must be between 0 and 1 (exclusive), "
                                "the fraction of total parameters to remove")
        if self.target_params is not None and self.target_params < 1:
            raise GQAPruneError(f"--target-params {self.target_params}: must be a positive parameter count")

    def removed(self, total: int) -> int:
        """Parameters to remove from a model of ``total`` parameters."""
        if self.ratio is not None:
            return round(total * self.ratio)
        if not self.target_params < total:
            raise GQAPruneError(f"--target-params {self.target_params}: must be below the model's "
                                f"{total:,} parameters")
        return total - int(self.target_params)

    def resolve(self, layout: ModelLayout, keep_first: int = 0, keep_last: int = 0, min_mlp: int = 1) -> Target:
        """Check the budget against the model before any expensive work."""
        removed = self.removed(layout.total_params)
        pruned = sorted(set(range(layout.num_layers)) - protected_layers(layout.num_layers, keep_first, keep_last))
        most = sum((layout.layers[i].n_kv - 1) * layout.group_params
                   + (layout.layers[i].n_mlp - max(min_mlp, 1)) * layout.channel_params for i in pruned)
        if removed > most:
            raise GQAPruneError(_too_much(layout, removed, len(pruned), min_mlp))
        return Target(self, removed, tuple(pruned), min_mlp)

    def to_dict(self) -> dict:
        return {"pruning_ratio": self.ratio, "target_params": self.target_params}


@dataclass(frozen=True)
class Target:
    """A budget resolved against one model: parameters to remove and the layers that may lose units."""

    budget: Budget
    removed: int
    pruned: tuple[int, ...]
    min_mlp: int = 1

    def provenance(self, layout: ModelLayout, round_mlp_to: int | None) -> dict:
        """What the plan records of its budget (the plan format's fields)."""
        return {"params_removed_target": self.removed, "budget": self.budget.to_dict(),
                "protected_layers": sorted(set(range(layout.num_layers)) - set(self.pruned)),
                "min_mlp": self.min_mlp, "round_mlp_to": round_mlp_to}


def protected_layers(n_layers: int, keep_first: int, keep_last: int) -> set[int]:
    if keep_first < 0 or keep_last < 0:
        raise GQAPruneError("--keep-first/--keep-last must be >= 0")
    if keep_first + keep_last >= n_layers:
        raise GQAPruneError(
            f"--keep-first {keep_first} + --keep-last {keep_last} protect {keep_first + keep_last} layers, but the "
            f"model has {n_layers}: nothing would be left to prune. Lower them."
        )
    return set(range(keep_first)) | set(range(n_layers - keep_last, n_layers))


def _kept_mlp_options(n_mlp: int, removed: float, min_mlp: int, round_to: int | None) -> list[int]:
    """Candidate kept-channel counts near ``n_mlp - removed`` that respect min and rounding."""
    want = n_mlp - removed
    if round_to and round_to > 1:
        lo = max(round_to * math.floor(want / round_to), round_to)
        cands = {lo, lo + round_to}
    else:
        cands = {math.floor(want), math.ceil(want)}
    return sorted(c for c in cands if max(min_mlp, 1) <= c <= n_mlp)


def solve_counts(layout: ModelLayout, removed: int, pruned: list[int], min_mlp: int,
                 round_mlp_to: int | None, kv_fraction: float | None = None) -> tuple[int, int]:
    """(KV groups removed, MLP channels removed) *per pruned layer* for the uniform layout.

    Among all feasible splits, the one whose achieved total is nearest the budget and,
    among those within one MLP-rounding step of it, whose attention and MLP fractions
    removed are most alike; with ``kv_fraction``, the split that removes that fraction of
    the KV groups (the MLP absorbs the rest of the budget).
    """
    L = len(pruned)
    s0 = layout.layers[pruned[0]]
    if any(layout.layers[i] != s0 for i in pruned):
        raise GQAPruneError("--layout uniform needs a model whose pruned layers all have the same shape; "
                            "use --layout per-layer for an already per-layer-pruned model")
    A, M = layout.group_params, layout.channel_params
    step = M * L * (round_mlp_to or 1)
    cands = []
    ks = range(s0.n_kv) if kv_fraction is None else [round(kv_fraction * s0.n_kv)]
    for k in ks:                              # keep >= 1 group
        if not 0 <= k < s0.n_kv:
            continue
        per_layer_mlp = (removed / L - k * A) / M
        for kept in _kept_mlp_options(s0.n_mlp, per_layer_mlp, min_mlp, round_mlp_to):
            m = s0.n_mlp - kept
            err = abs(L * (k * A + m * M) - removed)
            balance = abs(k / s0.n_kv - m / s0.n_mlp)
            cands.append((err, balance, k, m))
    if not cands:
        raise GQAPruneError(_too_much(layout, removed, len(pruned), min_mlp))
    best_err = min(c[0] for c in cands)
    if best_err > step:
        raise GQAPruneError(_too_much(layout, removed, len(pruned), min_mlp))
    close = [c for c in cands if c[0] <= best_err + step]
    _, _, k, m = min(close, key=lambda c: (c[1], c[0]))
    return k, m


def _too_much(layout: ModelLayout, removed: int, n_pruned: int, min_mlp: int) -> str:
    most = n_pruned * (max(s.n_kv for s in layout.layers) - 1) * layout.group_params + \
        n_pruned * (max(s.n_mlp for s in layout.layers) - max(min_mlp, 1)) * layout.channel_params
    return (f"the target removes {removed:,} parameters, but every pruned layer must keep at least one KV group "
            f"and --min-mlp {min_mlp} channels, which allows removing at most about {most:,} "
            f"({most / layout.total_params:.1%} of the model). Lower the ratio, raise --target-params, "
            "or unprotect layers (--keep-first/--keep-last).")


def per_layer_counts(layout, scores, removed, pruned, min_mlp, round_mlp_to, weights=None, kv_fraction=None,
                     mlp_only: bool = False):
    """Global totals split like the uniform case, then assigned by per-layer-normalised scores.

    ``mlp_only`` (the ``per-layer-mlp`` layout): every pruned layer loses the uniform layout's KV
    groups; only the MLP channels are spread over the layers.
    """
    if mlp_only:
        k, m_tot = _mlp_only_totals(layout, removed, pruned, min_mlp, kv_fraction)
        return {i: k for i in pruned}, _mlp_counts(layout, scores, m_tot, pruned, min_mlp, round_mlp_to, weights)
    A, M = layout.group_params, layout.channel_params
    n_kv_all = sum(layout.layers[i].n_kv for i in pruned)
    n_mlp_all = sum(layout.layers[i].n_mlp for i in pruned)
    kv_cap = sum(layout.layers[i].n_kv - 1 for i in pruned)
    mlp_cap = sum(layout.layers[i].n_mlp - max(min_mlp, 1) for i in pruned)
    best = None
    ks = range(kv_cap + 1) if kv_fraction is None else [round(kv_fraction * n_kv_all)]
    for k in ks:
        if not 0 <= k <= kv_cap:
            continue
        m = round((removed - k * A) / M)
        if not 0 <= m <= mlp_cap:
            continue
        key = (abs(k / n_kv_all - m / n_mlp_all), abs(k * A + m * M - removed))
        if best is None or key < best[0]:
            best = (key, k, m)
    if best is None:
        raise GQAPruneError(_too_much(layout, removed, len(pruned), min_mlp))
    _, k_tot, m_tot = best
    sizes = {"kv": {i: layout.layers[i].n_kv for i in pruned}}
    floors = {"kv": {i: 1 for i in pruned}}
    if weights:
        kv_rm = _assign_by_weights(sizes["kv"], floors["kv"], k_tot, weights)
    else:
        kv_rm = _assign_global(scores, "kv", pruned, k_tot, floors["kv"])
    return kv_rm, _mlp_counts(layout, scores, m_tot, pruned, min_mlp, round_mlp_to, weights)


def _mlp_only_totals(layout, removed, pruned, min_mlp, kv_fraction) -> tuple[int, int]:
    """(KV groups every pruned layer loses, MLP channels all of them lose together), balanced as the uniform
    split is; the layers must share one KV count."""
    n_kv = {layout.layers[i].n_kv for i in pruned}
    if len(n_kv) != 1:
        raise GQAPruneError("--layout per-layer-mlp keeps the same KV groups in every layer: the pruned layers of "
                            f"this model already differ in KV heads ({sorted(n_kv)}); use --layout per-layer")
    n_kv = n_kv.pop()
    A, M, L = layout.group_params, layout.channel_params, len(pruned)
    n_mlp_all = sum(layout.layers[i].n_mlp for i in pruned)
    mlp_cap = sum(layout.layers[i].n_mlp - max(min_mlp, 1) for i in pruned)
    best = None
    for k in (range(n_kv) if kv_fraction is None else [round(kv_fraction * n_kv)]):
        m = round((removed - k * L * A) / M)
        if not (0 <= k < n_kv and 0 <= m <= mlp_cap):
            continue
        key = (abs(k / n_kv - m / n_mlp_all), abs(k * L * A + m * M - removed))
        if best is None or key < best[0]:
            best = (key, k, m)
    if best is None:
        raise GQAPruneError(_too_much(layout, removed, L, min_mlp))
    return best[1], best[2]


def _mlp_counts(layout, scores, m_tot, pruned, min_mlp, round_mlp_to, weights) -> dict:
    """MLP channels each pruned layer loses: ``m_tot`` spread by weights or scores, widths then rounded."""
    sizes = {i: layout.layers[i].n_mlp for i in pruned}
    floors = {i: max(min_mlp, 1) for i in pruned}
    if weights:
        mlp_rm = _assign_by_weights(sizes, floors, m_tot, weights)
    else:
        mlp_rm = _assign_global(scores, "mlp", pruned, m_tot, floors)
    if round_mlp_to and round_mlp_to > 1:
        mlp_rm = _round_keeping_total(sizes, mlp_rm, m_tot, round_mlp_to)
    return mlp_rm


def _round_keeping_total(sizes: dict, mlp_rm: dict, m_tot: int, step: int) -> dict:
    """Every width a multiple of ``step`` (at least ``step``, at most the largest multiple <= the layer's width),
    with the total removed as close to ``m_tot`` as steps allow.

    Rounding each layer to its nearest multiple on its own drifts: when most layers sit just above a
    half-step they all round up, and the model keeps several steps x layers more than the budget. So
    floor every width, then hand whole steps back to the layers whose floor cut deepest (largest
    remainder first) while that brings the total closer to ``m_tot``; or take more, smallest remainder
    first, when the minimum widths left it short.
    """
    want = {i: sizes[i] - mlp_rm[i] for i in sizes}            # widths before rounding (channels)
    top = {i: (sizes[i] - sizes[i] % step) or sizes[i] for i in sizes}
    kept = {i: min(top[i], max(step, step * (want[i] // step))) for i in sizes}
    removed = sum(sizes[i] - kept[i] for i in sizes)
    by_remainder = sorted(sizes, key=lambda i: (kept[i] - want[i], i))   # deepest cut (most negative) first
    for i in by_remainder:             # give back: each pass moves the total by one step
        if removed - m_tot <= step / 2:
            break
        if kept[i] + step <= top[i]:
            kept[i] += step
            removed -= step
    for i in reversed(by_remainder):   # take more: only when the floors at `step` left the total short
        if m_tot - removed <= step / 2:
            break
        if kept[i] - step >= step:
            kept[i] -= step
            removed += step
    return {i: sizes[i] - kept[i] for i in sizes}


def _assign_by_weights(sizes: dict, floors: dict, total: int, weights: dict) -> dict:
    """Split ``total`` removals over layers in proportion to size / weight (capped at size - floor).

    Largest-remainder rounding, so the counts add up to ``total`` exactly; what a full layer
    cannot take is handed on to the others in the same proportions.
    """
    rm = {i: 0 for i in sizes}
    left, open_ = total, [i for i in sizes if sizes[i] > floors[i]]
    while left > 0 and open_:
        share = {i: sizes[i] / weights.get(i, 1.0) for i in open_}
        z = sum(share.values())
        want = {i: left * share[i] / z for i in open_}
        cap = {i: sizes[i] - floors[i] - rm[i] for i in open_}
        base = {i: min(cap[i], int(want[i])) for i in open_}
        extra = left - sum(base.values())
        for i in sorted(open_, key=lambda i: -(want[i] - int(want[i]))):
            if extra <= 0:
                break
            if base[i] < cap[i]:
                base[i] += 1
                extra -= 1
        for i in open_:
            rm[i] += base[i]
        left -= sum(base.values())
        open_ = [i for i in open_ if rm[i] < sizes[i] - floors[i]]
    return rm


def _assign_global(scores, kind, pruned, total, floor):
    """Remove ``total`` units of ``kind`` with the lowest per-layer-normalised scores, keeping ``floor``."""
    cands = []
    for i in pruned:
        s = scores[i][kind].double()
        norm = s / s.mean().clamp_min(1e-30)
        order = torch.argsort(norm, stable=True)
        # the layer's best `floor` units are never candidates
        for j in order[: len(order) - floor[i]].tolist():
            cands.append((norm[j].item(), i))
    cands.sort(key=lambda c: c[0])
    rm = {i: 0 for i in pruned}
    for _, i in cands[:total]:
        rm[i] += 1
    return rm
