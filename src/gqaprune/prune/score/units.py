"""Per-weight terms -> one score per unit: which slice of each projection belongs to which unit.

Each projection contributes to units along one axis: q/k/v/gate/up along rows (output
features), o/down along columns (input features), as docs/architecture.md defines the units.
``reduce_to_units`` sums an elementwise term over each unit's slice of one projection; a
unit's score is the sum over its projections.
"""

from __future__ import annotations

import torch

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")

# projection name -> (unit kind, axis the units lie along)
PROJ_AXIS = {
    "q_proj": ("kv", "row_q"), "k_proj": ("kv", "row_kv"), "v_proj": ("kv", "row_kv"), "o_proj": ("kv", "col_q"),
    "gate_proj": ("mlp", "row"), "up_proj": ("mlp", "row"), "down_proj": ("mlp", "col"),
}


def projection(layer, proj: str) -> torch.nn.Linear:
    """``layer``'s projection ``proj`` (q/k/v/o in self_attn, gate/up/down in mlp)."""
    return getattr(layer.self_attn if proj in ATTN_PROJS else layer.mlp, proj)


def reduce_to_units(t: torch.Tensor, proj: str, n_units: int, is_bias: bool = False) -> torch.Tensor:
    """Sum ``t`` (a weight- or bias-shaped tensor) over each unit's slice -> shape (n_units,).

    o_proj and down_proj biases are per hidden unit, not per pruning unit: they contribute nothing.
    """
    _, axis = PROJ_AXIS[proj]
    if is_bias:
        if axis.startswith("col"):
            return torch.zeros(n_units, dtype=t.dtype, device=t.device)
        return t.reshape(n_units, -1).sum(1)
    if axis.startswith("row"):
        return t.reshape(n_units, -1).sum(1)      # rows are contiguous per unit
    return t.reshape(t.shape[0], n_units, -1).sum((0, 2))  # columns grouped per unit


def zeros(layout, dtype=torch.float64) -> list[dict[str, torch.Tensor]]:
    """One zero score per unit, per layer: [{'kv': (n_kv,), 'mlp': (n_mlp,)}, ...]."""
    return [{"kv": torch.zeros(s.n_kv, dtype=dtype), "mlp": torch.zeros(s.n_mlp, dtype=dtype)} for s in layout.layers]
