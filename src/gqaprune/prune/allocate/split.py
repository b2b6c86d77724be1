"""The attention / MLP split (``--split search``), measured on calibration data.

By default attention and MLP lose the same fraction of their units (budget.py). Per
parameter they need not be equally important (benchmarks/results/ablation_smollm2.md
measures it), so ``--split search`` tries every share of KV groups removed (0, 1/n_kv,
2/n_kv, ...; the MLP takes the rest of the budget), measures each whole plan's KL from
the dense model on the same few calibration samples (one forward pass each), and keeps
the lowest. The candidates and their KLs go into the provenance.
"""

from __future__ import annotations

import logging
import time

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import ModelLayout, decoder_layers
from gqaprune.prune.layerwise import kl, remove_hooks, tokens_scored, zero_units

log = logging.getLogger(__name__)


class DenseReference:
    """The unpruned model's next-token log-probabilities on a few calibration samples, kept for comparisons."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.batches = [ids[b:b + batch_size] for b in range(0, ids.shape[0], batch_size)]
        self.ref = [self._logprobs(x) for x in self.batches]
        self.tokens = tokens_scored(self.batches)

    def _logprobs(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=x.to(device), use_cache=False).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def plan_kl(self, plan, layout: ModelLayout) -> float:
        """Mean KL(dense || model cut to ``plan``) per token; units removed by zeroing inputs, weights untouched."""
        layers = decoder_layers(self.model)
        r, d = layout.q_per_kv, layout.head_dim
        hooks = []
        was = self.model.training
        self.model.eval()
        try:
            for i, (layer, s) in enumerate(zip(layers, layout.layers)):
                hooks += zero_units(layer, sorted(set(range(s.n_kv)) - set(plan.kv_groups[i])),
                                    sorted(set(range(s.n_mlp)) - set(plan.mlp_channels[i])), r, d)
            total = sum(kl(ref, self._logprobs(x)) for ref, x in zip(self.ref, self.batches))
        finally:
            remove_hooks(hooks)
            self.model.train(was)
        return total / self.tokens


def search_split(model, layout: ModelLayout, make, ids: torch.Tensor, *, batch_size: int = 8,
                 reference: DenseReference | None = None) -> tuple[object, dict]:
    """Try each share of KV groups removed (0, 1/n_kv, ...; the MLP absorbs the rest of the budget).

    ``make(kv_fraction)`` returns the plan for that share (GQAPruneError when infeasible).
    Returns (the plan whose output moves least from the dense model's, KL per token on
    ``ids``; the report of every candidate).
    """
    t0 = time.perf_counter()
    ref = reference or DenseReference(model, ids, batch_size)
    n_kv = max(s.n_kv for s in layout.layers)
    cands, best = [], None
    for j in range(n_kv):
        f = j / n_kv
        try:
            plan = make(f)
        except GQAPruneError as e:
            cands.append({"kv_fraction": f, "infeasible": str(e)[:200]})
            continue
        plan_kl = ref.plan_kl(plan, layout)
        kv_rm = sum(s.n_kv for s in layout.layers) - sum(plan.kept_kv)
        mlp_rm = sum(s.n_mlp for s in layout.layers) - sum(plan.kept_mlp)
        cands.append({"kv_fraction": round(f, 4), "kv_groups_removed": kv_rm, "mlp_channels_removed": mlp_rm,
                      "params_after": plan.provenance["params_after"], "kl": plan_kl})
        log.info("split: %.0f%% of KV groups removed -> KL %.4f", 100 * f, plan_kl)
        if best is None or plan_kl < best[1]:
            best = (plan, plan_kl, f)
    if best is None:
        raise GQAPruneError("--split search: no share of KV groups fits the budget; use --split balanced")
    rep = {"mode": "search", "tokens": ref.tokens, "candidates": cands, "chosen_kv_fraction": round(best[2], 4),
           "seconds": round(time.perf_counter() - t0, 2)}
    return best[0], rep
