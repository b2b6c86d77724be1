"""Data-free criteria: ``magnitude`` (L2 norm of each unit's weights) and ``random`` (a seeded baseline)."""

from __future__ import annotations

import torch

from gqaprune.models.layout import decoder_layers
from gqaprune.prune.score.units import ATTN_PROJS, MLP_PROJS, projection, reduce_to_units


class Magnitude:
    """sqrt(sum_w w^2) over a unit's weights (and biases) across its projections."""

    name = "magnitude"
    needs_calibration = False

    def __call__(self, model, layout, ids, ctx) -> list[dict]:
        out = []
        for layer, s in zip(decoder_layers(model), layout.layers):
            scores = {}
            for kind, projs, n in (("kv", ATTN_PROJS, s.n_kv), ("mlp", MLP_PROJS, s.n_mlp)):
                total = torch.zeros(n, dtype=torch.float32, device=projection(layer, projs[0]).weight.device)
                for p in projs:
                    lin = projection(layer, p)
                    total += reduce_to_units(lin.weight.float() ** 2, p, n)
                    if lin.bias is not None:
                        total += reduce_to_units(lin.bias.float() ** 2, p, n, is_bias=True)
                scores[kind] = total.sqrt().cpu()
            out.append(scores)
        return out


class Random:
    """Uniform random scores from ``ctx.seed``: the baseline every criterion must beat."""

    name = "random"
    needs_calibration = False

    def __call__(self, model, layout, ids, ctx) -> list[dict]:
        gen = torch.Generator().manual_seed(ctx.seed)
        return [{"kv": torch.rand(s.n_kv, generator=gen), "mlp": torch.rand(s.n_mlp, generator=gen)}
                for s in layout.layers]
