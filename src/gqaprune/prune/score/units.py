"""Per-weight terms -> one score per unit: which slice of each projection belongs to which unit.

Each projection contributes to units along one axis: q/k/v/gate/up along rows (output
features), o/down along columns (input features), as docs/architecture.md defines the units;
where they sit in each family (fused projections too) is models/family.py's description.
``reduce`` sums an elementwise term over each unit's slice of one projection; a unit's score is
the sum over its projections.
"""

from __future__ import annotations

import torch

from gqaprune.models.family import Proj, family_of, projection, reduce_to_units
from gqaprune.models.layout import LayerShape, ModelLayout, decoder_layers


def layer_projections(model) -> list[list[tuple[Proj, torch.nn.Linear]]]:
    """Per decoder layer: every projection that holds units, with its description."""
    fam = family_of(model)
    return [[(p, projection(layer, p)) for p in fam.projections] for layer in decoder_layers(model)]


def reduce(t: torch.Tensor, proj: Proj, shape: LayerShape, layout: ModelLayout, is_bias: bool = False) -> torch.Tensor:
    """Sum ``t`` (weight- or bias-shaped) over each unit's slice of ``proj`` in a layer of ``shape``."""
    return reduce_to_units(t, proj, shape.n_kv, shape.n_mlp, layout.q_per_kv, layout.head_dim, is_bias)


def zeros(layout, dtype=torch.float64) -> list[dict[str, torch.Tensor]]:
    """One zero score per unit, per layer: [{'kv': (n_kv,), 'mlp': (n_mlp,)}, ...]."""
    return [{"kv": torch.zeros(s.n_kv, dtype=dtype), "mlp": torch.zeros(s.n_mlp, dtype=dtype)} for s in layout.layers]
