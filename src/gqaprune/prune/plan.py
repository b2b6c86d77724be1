"""The prune plan: which KV groups and MLP channels every layer keeps, as JSON data.

``make_plan`` turns scores and a parameter budget into a plan; ``apply_plan`` (surgery.py)
applies it. A plan can be saved, read, diffed, edited and applied again to the
original model (``gqaprune prune --plan plan.json``).

Budget. ``--pruning-ratio R`` removes the fraction R of the model's *total* parameters
(embeddings and lm_head included, tied weights counted once). LLM-Pruner's
``--pruning_ratio`` is instead the fraction of heads/channels removed inside each
pruned layer, so the same number removes much less of the whole model there.

How the budget is split. Attention (KV groups) and MLP (channels) give up the same
fraction of their units as nearly as the KV-group granularity allows; the MLP count
then absorbs the remainder so the achieved total is the nearest one the unit sizes allow.
``uniform``: every pruned layer keeps the same counts (a plain Llama config).
``per-layer``: the same totals, but which layer gives up which unit is decided by
ranking units across layers with scores normalised per layer (score / layer mean);
with sensitivity weights (``--allocation sensitivity``) each layer's count is instead
proportional to its size / its weight, and the scores pick the units within the layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.prune.structure import ModelLayout

LAYOUTS = ("uniform", "per-layer")
PLAN_VERSION = 1


@dataclass
class PrunePlan:
    """Kept units per layer plus provenance. Indices refer to the *source* model's units."""

    layout: str
    kv_groups: list[list[int]]           # per layer: kept KV-group indices, ascending
    mlp_channels: list[list[int]]        # per layer: kept MLP-channel indices, ascending
    source_shape: dict                   # head_dim, q_per_kv, hidden_size, kv per layer, mlp per layer
    provenance: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def kept_kv(self) -> list[int]:
        return [len(g) for g in self.kv_groups]

    @property
    def kept_mlp(self) -> list[int]:
        return [len(c) for c in self.mlp_channels]

    def is_uniform(self) -> bool:
        return len(set(self.kept_kv)) == 1 and len(set(self.kept_mlp)) == 1

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """Readable and diffable: one line per layer for the index lists."""
        d = self.to_dict()
        layers = [{"layer": i, "kv_groups": g, "mlp_channels": _ranges(c)}
                  for i, (g, c) in enumerate(zip(self.kv_groups, self.mlp_channels))]
        head = {k: v for k, v in d.items() if k not in ("kv_groups", "mlp_channels")}
        body = json.dumps(head, indent=2)[:-2]
        lines = ",\n    ".join(json.dumps(x, separators=(", ", ": ")) for x in layers)
        return body + ',\n  "layers": [\n    ' + lines + "\n  ]\n}\n"

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        try:
            if "layers" in d:
                kv = [list(x["kv_groups"]) for x in d["layers"]]
                mlp = [_unranges(x["mlp_channels"]) for x in d["layers"]]
            else:
                kv, mlp = d["kv_groups"], [_unranges(c) for c in d["mlp_channels"]]
            return cls(layout=d["layout"], kv_groups=kv, mlp_channels=mlp, source_shape=d["source_shape"],
                       provenance=d.get("provenance", {}), version=d.get("version", PLAN_VERSION))
        except (KeyError, TypeError, ValueError) as e:
            raise GQAPruneError(f"plan: not a gqaprune plan ({type(e).__name__}: {e})") from e

    @classmethod
    def load(cls, path) -> PrunePlan:
        p = Path(path)
        if not p.is_file():
            raise GQAPruneError(f"--plan {path}: no such file")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise GQAPruneError(f"--plan {path}: not valid JSON ({e})") from e

    def check_matches(self, layout: ModelLayout, label: str = "the model") -> None:
        """Raise GQAPruneError when this plan was not made for a model of ``layout``'s shape."""
        s = self.source_shape
        want = {"num_layers": layout.num_layers, "head_dim": layout.head_dim, "q_per_kv": layout.q_per_kv,
                "hidden_size": layout.hidden_size, "kv_per_layer": [x.n_kv for x in layout.layers],
                "mlp_per_layer": [x.n_mlp for x in layout.layers]}
        bad = [f"{k}: plan {s.get(k)!r} vs model {v!r}" for k, v in want.items() if s.get(k) != v]
        if len(self.kv_groups) != layout.num_layers or len(self.mlp_channels) != layout.num_layers:
            bad.append(f"plan lists {len(self.kv_groups)} layers, model has {layout.num_layers}")
        for i, (g, c, ls) in enumerate(zip(self.kv_groups, self.mlp_channels, layout.layers)):
            if not g or not c:
                bad.append(f"layer {i} keeps no KV group or no MLP channel")
            elif max(g) >= ls.n_kv or min(g) < 0 or max(c) >= ls.n_mlp or min(c) < 0 or len(set(g)) != len(g) \
                    or len(set(c)) != len(c):
                bad.append(f"layer {i}: indices out of range or repeated")
        if bad:
            shown = "; ".join(bad[:4]) + (f"; ... ({len(bad)} problems)" if len(bad) > 4 else "")
            raise GQAPruneError(f"--plan does not match {label}: {shown}. Apply a plan to the model it was made for.")


def _ranges(idx: list[int]) -> list:
    """Compress ascending indices: runs of 3+ become [start, stop) pairs -> readable JSON."""
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        if j - i >= 2:
            out.append([idx[i], idx[j] + 1])
        else:
            out.extend(idx[i:j + 1])
        i = j + 1
    return out


def _unranges(items) -> list[int]:
    out = []
    for x in items:
        if isinstance(x, list):
            out.extend(range(int(x[0]), int(x[1])))
        else:
            out.append(int(x))
    return out


@dataclass
class Budget:
    """What to remove: exactly one of ``ratio`` (of total params) or ``target_params`` (params to keep)."""

    ratio: float | None = None
    target_params: int | None = None

    def removed(self, total: int) -> int:
        if (self.ratio is None) == (self.target_params is None):
            raise GQAPruneError("give exactly one of --pruning-ratio and --target-params")
        if self.ratio is not None:
            if not 0 < self.ratio < 1:
                raise GQAPruneError(f"--pruning-ratio {self.ratio}: must be between 0 and 1 (exclusive), "
                                    "the fraction of total parameters to remove")
            return round(total * self.ratio)
        if not 0 < self.target_params < total:
            raise GQAPruneError(f"--target-params {self.target_params}: must be between 0 and the model's "
                                f"{total:,} parameters")
        return total - int(self.target_params)


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


def check_budget(layout: ModelLayout, budget: Budget, keep_first: int = 0, keep_last: int = 0,
                 min_mlp: int = 1) -> tuple[int, list[int]]:
    """Validate the budget against the model before any expensive work; (params to remove, pruned layers)."""
    removed = budget.removed(layout.total_params)
    pruned = sorted(set(range(layout.num_layers)) - protected_layers(layout.num_layers, keep_first, keep_last))
    most = sum((layout.layers[i].n_kv - 1) * layout.group_params
               + (layout.layers[i].n_mlp - max(min_mlp, 1)) * layout.channel_params for i in pruned)
    if removed > most:
        raise GQAPruneError(_too_much(layout, removed, len(pruned), min_mlp))
    return removed, pruned


def make_plan(layout: ModelLayout, scores: list[dict], budget: Budget, *, layout_kind: str = "uniform",
              keep_first: int = 0, keep_last: int = 0, min_mlp: int = 1, round_mlp_to: int | None = None,
              provenance: dict | None = None, layer_weights: dict[int, float] | None = None,
              kv_fraction: float | None = None) -> PrunePlan:
    """Choose the kept units per layer from scores and a budget.

    ``layer_weights`` (per-layer layout only): layer -> sensitivity weight (sensitivity.py).
    Then the attention and MLP totals are split over the layers in proportion to
    (units in the layer) / weight, instead of by ranking normalised scores across layers: a
    layer with weight 2 gives up half the average fraction of its units, one with weight
    1/2 twice the average. Which units go within a layer is still decided by the scores.

    ``kv_fraction``: remove this fraction of the pruned layers' KV groups (rounded to whole
    groups) and let the MLP absorb the rest of the budget, instead of balancing the two.
    """
    if layout_kind not in LAYOUTS:
        raise GQAPruneError(f"--layout {layout_kind}: choose one of {', '.join(LAYOUTS)}")
    if layer_weights is not None and layout_kind != "per-layer":
        raise GQAPruneError("per-layer weights (--allocation sensitivity) need --layout per-layer: the uniform "
                            "layout removes the same counts from every layer")
    removed, pruned = check_budget(layout, budget, keep_first, keep_last, min_mlp)
    if layout_kind == "uniform":
        k, m = solve_counts(layout, removed, pruned, min_mlp, round_mlp_to, kv_fraction)
        kv_rm = {i: k for i in pruned}
        mlp_rm = {i: m for i in pruned}
    else:
        kv_rm, mlp_rm = _per_layer_counts(layout, scores, removed, pruned, min_mlp, round_mlp_to, layer_weights,
                                          kv_fraction)
    kv_keep, mlp_keep = [], []
    for i, (s, sc) in enumerate(zip(layout.layers, scores)):
        kv_keep.append(_top(sc["kv"], s.n_kv - kv_rm.get(i, 0)))
        mlp_keep.append(_top(sc["mlp"], s.n_mlp - mlp_rm.get(i, 0)))
    return finish_plan(layout, kv_keep, mlp_keep, budget, removed, pruned, layout_kind=layout_kind,
                       min_mlp=min_mlp, round_mlp_to=round_mlp_to, provenance=provenance)


def source_shape(layout: ModelLayout) -> dict:
    return {"num_layers": layout.num_layers, "head_dim": layout.head_dim, "q_per_kv": layout.q_per_kv,
            "hidden_size": layout.hidden_size, "kv_per_layer": [x.n_kv for x in layout.layers],
            "mlp_per_layer": [x.n_mlp for x in layout.layers]}


def finish_plan(layout: ModelLayout, kv_keep: list[list[int]], mlp_keep: list[list[int]], budget: Budget,
                removed: int, pruned: list[int], *, layout_kind: str, min_mlp: int = 1,
                round_mlp_to: int | None = None, provenance: dict | None = None) -> PrunePlan:
    """A PrunePlan for ``layout`` keeping the given indices, with the budget's provenance."""
    after = layout.params_with([len(g) for g in kv_keep], [len(c) for c in mlp_keep])
    prov = dict(provenance or {})
    prov.update({"params_before": layout.total_params, "params_after": after,
                 "params_removed_target": removed, "reduction": 1 - after / layout.total_params,
                 "budget": {"pruning_ratio": budget.ratio, "target_params": budget.target_params},
                 "protected_layers": sorted(set(range(layout.num_layers)) - set(pruned)),
                 "min_mlp": min_mlp, "round_mlp_to": round_mlp_to})
    return PrunePlan(layout=layout_kind, kv_groups=[sorted(g) for g in kv_keep],
                     mlp_channels=[sorted(c) for c in mlp_keep], source_shape=source_shape(layout), provenance=prov)


def _top(score: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, ascending (stable for ties)."""
    order = torch.argsort(score.float(), descending=True, stable=True)
    return sorted(order[:keep].tolist())


def _per_layer_counts(layout, scores, removed, pruned, min_mlp, round_mlp_to, weights=None, kv_fraction=None):
    """Global totals split like the uniform case, then assigned by per-layer-normalised scores."""
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
    sizes = {"kv": {i: layout.layers[i].n_kv for i in pruned}, "mlp": {i: layout.layers[i].n_mlp for i in pruned}}
    floors = {"kv": {i: 1 for i in pruned}, "mlp": {i: max(min_mlp, 1) for i in pruned}}
    if weights:
        kv_rm = _assign_by_weights(sizes["kv"], floors["kv"], k_tot, weights)
        mlp_rm = _assign_by_weights(sizes["mlp"], floors["mlp"], m_tot, weights)
    else:
        kv_rm = _assign_global(scores, "kv", pruned, k_tot, floors["kv"])
        mlp_rm = _assign_global(scores, "mlp", pruned, m_tot, floors["mlp"])
    if round_mlp_to and round_mlp_to > 1:
        for i in pruned:
            n = layout.layers[i].n_mlp
            kept = n - mlp_rm[i]
            kept = min(n, max(round_mlp_to, round_mlp_to * round(kept / round_mlp_to)))
            mlp_rm[i] = n - kept
    return kv_rm, mlp_rm


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
