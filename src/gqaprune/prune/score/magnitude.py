"""Data-free criteria: ``magnitude`` (L2 norm of each unit's weights) and ``random`` (a seeded baseline)."""

from __future__ import annotations

import torch

from gqaprune.prune.score.units import layer_projections, reduce


class Magnitude:
    """sqrt(sum_w w^2) over a unit's weights (and biases) across its projections."""

    name = "magnitude"
    needs_calibration = False

    def __call__(self, model, layout, ids, ctx) -> list[dict]:
        out = []
        for projs, s in zip(layer_projections(model), layout.layers):
            total = {"kv": torch.zeros(s.n_kv, dtype=torch.float32), "mlp": torch.zeros(s.n_mlp, dtype=torch.float32)}
            for p, lin in projs:
                total[p.kind] += reduce(lin.weight.float() ** 2, p, s, layout).cpu()
                if lin.bias is not None:
                    total[p.kind] += reduce(lin.bias.float() ** 2, p, s, layout, is_bias=True).cpu()
            out.append({k: v.sqrt() for k, v in total.items()})
        return out


class Random:
    """Uniform random scores from ``ctx.seed``: the baseline every criterion must beat."""

    name = "random"
    needs_calibration = False

    def __call__(self, model, layout, ids, ctx) -> list[dict]:
        gen = torch.Generator().manual_seed(ctx.seed)
        return [{"kv": torch.rand(s.n_kv, generator=gen), "mlp": torch.rand(s.n_mlp, generator=gen)}
                for s in layout.layers]
