"""Pure functions: per-weight terms or statistics -> one score per unit.

Each projection contributes to units along one axis: q/k/v/gate/up along rows
(output features), o/down along columns (input features). ``reduce_to_units`` sums
an elementwise term over each unit's slice of one projection; a unit's score is
the sum over its projections.

Criteria (``--criterion``):
  taylor         sum_w |w * g|            first-order Taylor, per weight
  taylor-vector  |sum_w w * g|            first-order Taylor of the whole unit
  taylor-second  sum_w |w*g - 0.5*(w*g)^2|   adds the diagonal-Fisher term (F ~ g^2)
  magnitude      sqrt(sum_w w^2)          L2 of the unit's weights, data-free
  activation     sum_j mean|x_j| * ||W[:, j]||   on the inputs of o_proj / down_proj
  random         uniform random, seeded   a baseline

Gradient criteria are accumulated per calibration batch ``b``: score = sum_b s(w, g_b).
That is what lets calibration free each gradient as soon as it is ready (no full copy
of all gradients is kept); with one batch holding every sample it is exactly
LLM-Pruner's estimator on the summed gradient.
"""

from __future__ import annotations

import torch

CRITERIA = ("taylor", "taylor-vector", "taylor-second", "magnitude", "activation", "random")
GRADIENT_CRITERIA = ("taylor", "taylor-vector", "taylor-second")

# projection name -> (unit kind, axis the units lie along)
PROJ_AXIS = {
    "q_proj": ("kv", "row_q"), "k_proj": ("kv", "row_kv"), "v_proj": ("kv", "row_kv"), "o_proj": ("kv", "col_q"),
    "gate_proj": ("mlp", "row"), "up_proj": ("mlp", "row"), "down_proj": ("mlp", "col"),
}


def elementwise_term(criterion: str, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The per-weight quantity a gradient criterion sums (in float32)."""
    wg = w.float() * g.float()
    if criterion == "taylor":
        return wg.abs()
    if criterion == "taylor-vector":
        return wg  # signed: summed per unit, then |.| at the end of the batch
    if criterion == "taylor-second":
        return (wg - 0.5 * wg * wg).abs()
    raise ValueError(f"not a gradient criterion: {criterion}")


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


def magnitude_scores(layer, n_kv: int) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's weights (and biases) across its projections."""
    out = {}
    for kind, projs in (("kv", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        mod = layer.self_attn if kind == "kv" else layer.mlp
        n = n_kv if kind == "kv" else mod.gate_proj.out_features
        total = torch.zeros(n, dtype=torch.float32, device=mod.gate_proj.weight.device if kind == "mlp" else mod.q_proj.weight.device)
        for p in projs:
            lin = getattr(mod, p)
            total += reduce_to_units(lin.weight.float() ** 2, p, n)
            if lin.bias is not None:
                total += reduce_to_units(lin.bias.float() ** 2, p, n, is_bias=True)
        out[kind] = total.sqrt()
    return out


def activation_scores(layer, n_kv: int, o_in_abs_mean: torch.Tensor, down_in_abs_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean|x_j| on o_proj/down_proj inputs times the L2 norm of weight column j, summed per unit."""
    o_w = layer.self_attn.o_proj.weight.float()
    d_w = layer.mlp.down_proj.weight.float()
    o_term = o_in_abs_mean.float().to(o_w.device) * o_w.norm(dim=0)
    d_term = down_in_abs_mean.float().to(d_w.device) * d_w.norm(dim=0)
    return {"kv": o_term.reshape(n_kv, -1).sum(1), "mlp": d_term}


def random_scores(layout, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"kv": torch.rand(s.n_kv, generator=gen), "mlp": torch.rand(s.n_mlp, generator=gen)} for s in layout.layers]
