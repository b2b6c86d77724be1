"""The prune plan: which KV groups and MLP channels every layer keeps, as JSON data.

``make_plan`` turns scores and a resolved budget (budget.py) into a plan; ``apply_plan``
(surgery.py) applies it. A plan can be saved, read, diffed, edited and applied again to
the original model (``gqaprune prune --plan plan.json``); its recorded counts are claims,
checked against the model it is applied to.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import ModelLayout
from gqaprune.prune.budget import Target, per_layer_counts, solve_counts

# uniform: the same counts in every pruned layer; per-layer: KV groups and MLP channels per layer;
# per-layer-mlp: the same KV groups everywhere, MLP widths per layer (DeciLM block_configs: vLLM serves it)
LAYOUTS = ("uniform", "per-layer", "per-layer-mlp")
PER_LAYER = ("per-layer", "per-layer-mlp")
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
            plan = cls(layout=d["layout"], kv_groups=kv, mlp_channels=mlp, source_shape=d["source_shape"],
                       provenance=d.get("provenance", {}), version=d.get("version", PLAN_VERSION))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GQAPruneError(f"plan: not a gqaprune plan ({type(e).__name__}: {e})") from e
        for i, (g, c) in enumerate(zip(plan.kv_groups, plan.mlp_channels)):
            bad = [x for x in list(g) + list(c) if type(x) is not int]   # JSON true/1.0/"0" are not indices
            if bad:
                raise GQAPruneError(f"plan: layer {i} lists {bad[0]!r} ({type(bad[0]).__name__}) as a unit index; "
                                    "indices must be whole numbers")
        if plan.layout not in LAYOUTS:
            raise GQAPruneError(f"plan: layout {plan.layout!r} is not one of {', '.join(LAYOUTS)}")
        return plan

    @classmethod
    def load(cls, path) -> PrunePlan:
        p = Path(path)
        if not p.is_file():
            raise GQAPruneError(f"--plan {path}: no such file")
        try:
            d = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise GQAPruneError(f"--plan {path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(d if isinstance(d, dict) else {})
        except GQAPruneError as e:
            raise GQAPruneError(f"--plan {path}: {str(e).removeprefix('plan: ')}") from e

    def check_matches(self, layout: ModelLayout, label: str = "the model") -> None:
        """Raise GQAPruneError when this plan was not made for a model of ``layout``'s shape."""
        s = self.source_shape
        want = {"num_layers": layout.num_layers, "head_dim": layout.head_dim, "q_per_kv": layout.q_per_kv,
                "hidden_size": layout.hidden_size, "kv_per_layer": [x.n_kv for x in layout.layers],
                "mlp_per_layer": [x.n_mlp for x in layout.layers]}
        bad = [f"{k}: plan {s.get(k)!r} vs model {v!r}" for k, v in want.items() if s.get(k) != v]
        if s.get("family", "llama") != layout.family:   # plans written before families were recorded are Llama's
            bad.insert(0, f"family: plan {s.get('family', 'llama')!r} vs model {layout.family!r}")
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

    def check_claims(self, layout: ModelLayout, label: str = "the model") -> None:
        """A saved plan's recorded counts are claims: refuse one whose counts are not what it gives on ``layout``."""
        self.check_matches(layout, label)
        prov = self.provenance
        got = {"params_before": layout.total_params, "params_after": layout.params_with(self.kept_kv, self.kept_mlp)}
        bad = [f"its provenance says {k} {prov[k]!r}, but it gives {v:,} on {label}" for k, v in got.items()
               if k in prov and prov[k] != v]
        if bad:
            raise GQAPruneError(f"--plan: {'; '.join(bad)}. The plan was edited or made for another model; fix or "
                                "remove the recorded count, or apply the plan to the model it was made for.")


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


def make_plan(layout: ModelLayout, scores: list[dict], target: Target, *, layout_kind: str = "uniform",
              round_mlp_to: int | None = None, provenance: dict | None = None,
              layer_weights: dict[int, float] | None = None, kv_fraction: float | None = None) -> PrunePlan:
    """Choose the kept units per layer from scores and a resolved budget.

    ``layer_weights`` (per-layer layout only): layer -> sensitivity weight (allocate/sensitivity.py).
    Then the attention and MLP totals are split over the layers in proportion to
    (units in the layer) / weight, instead of by ranking normalised scores across layers: a
    layer with weight 2 gives up half the average fraction of its units, one with weight
    1/2 twice the average. Which units go within a layer is still decided by the scores.

    ``kv_fraction``: remove this fraction of the pruned layers' KV groups (rounded to whole
    groups) and let the MLP absorb the rest of the budget, instead of balancing the two.
    """
    if layout_kind not in LAYOUTS:
        raise GQAPruneError(f"--layout {layout_kind}: choose one of {', '.join(LAYOUTS)}")
    if layer_weights is not None and layout_kind not in PER_LAYER:
        raise GQAPruneError("per-layer weights (--allocation sensitivity) need --layout per-layer: the uniform "
                            "layout removes the same counts from every layer")
    pruned = list(target.pruned)
    if layout_kind == "uniform":
        k, m = solve_counts(layout, target.removed, pruned, target.min_mlp, round_mlp_to, kv_fraction)
        kv_rm = {i: k for i in pruned}
        mlp_rm = {i: m for i in pruned}
    else:
        kv_rm, mlp_rm = per_layer_counts(layout, scores, target.removed, pruned, target.min_mlp, round_mlp_to,
                                         layer_weights, kv_fraction, mlp_only=layout_kind == "per-layer-mlp")
    kv_keep, mlp_keep = [], []
    for i, (s, sc) in enumerate(zip(layout.layers, scores)):
        kv_keep.append(_top(sc["kv"], s.n_kv - kv_rm.get(i, 0)))
        mlp_keep.append(_top(sc["mlp"], s.n_mlp - mlp_rm.get(i, 0)))
    return finish_plan(layout, kv_keep, mlp_keep, target, layout_kind=layout_kind, round_mlp_to=round_mlp_to,
                       provenance=provenance)


def source_shape(layout: ModelLayout) -> dict:
    return {"family": layout.family, "num_layers": layout.num_layers, "head_dim": layout.head_dim,
            "q_per_kv": layout.q_per_kv,
            "hidden_size": layout.hidden_size, "kv_per_layer": [x.n_kv for x in layout.layers],
            "mlp_per_layer": [x.n_mlp for x in layout.layers]}


def finish_plan(layout: ModelLayout, kv_keep: list[list[int]], mlp_keep: list[list[int]], target: Target, *,
                layout_kind: str, round_mlp_to: int | None = None, provenance: dict | None = None) -> PrunePlan:
    """A PrunePlan for ``layout`` keeping the given indices, with the budget's provenance."""
    after = layout.params_with([len(g) for g in kv_keep], [len(c) for c in mlp_keep])
    prov = dict(provenance or {})
    prov.update({"params_before": layout.total_params, "params_after": after,
                 "reduction": 1 - after / layout.total_params, **target.provenance(layout, round_mlp_to),
                 # what unit granularity (and --round-mlp-to) costs against the budget: + = more kept than asked
                 "params_vs_target": after - (layout.total_params - target.removed)})
    return PrunePlan(layout=layout_kind, kv_groups=[sorted(g) for g in kv_keep],
                     mlp_channels=[sorted(c) for c in mlp_keep], source_shape=source_shape(layout), provenance=prov)


def _top(score: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, ascending (stable for ties)."""
    order = torch.argsort(score.float(), descending=True, stable=True)
    return sorted(order[:keep].tolist())
