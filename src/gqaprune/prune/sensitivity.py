"""Layer sensitivity for the per-layer layout (``--allocation sensitivity``).

How much does pruning layer i *alone* cost? For every pruned layer, remove its
lowest-scored units at the counts the uniform layout would remove there (so every
layer is probed with the same share), run the model on a few calibration samples, and
record the rise of the calibration loss (nats per token) over the unpruned model:

    delta_i = loss(model with layer i's probe units removed) - loss(model)

The per-layer layout ranks units across layers by their score normalised per layer
(score / layer mean, see plan.py); sensitivity multiplies layer i's normalised scores by

    weight_i = clip(sqrt(delta_i / mean_j(delta_j)), 1/2, 2)

so a layer whose pruning hurts the loss four times the average keeps its units as if
they scored twice as high. The square root and the bounds are deliberate: the probe
measures one share per layer, and linear weights extrapolate that far beyond it (a layer
that barely reacts to losing its share would be stripped to its last channel). The
deltas, weights and the resulting counts go into the plan's provenance, so the
allocation can be read and argued with.

Cost: the hidden states entering every layer are computed once and kept (layers x
tokens x hidden), so probing layer i reruns only layers i..L-1 and the head: about
L/2 + L * (head cost / layer cost) forward passes in all, on ``samples`` sequences.
Units are removed by zeroing their o_proj / down_proj input features in a forward
pre-hook (exactly equivalent to slicing them away); no weight is modified.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from gqaprune.errors import GQAPruneError
from gqaprune.prune.compensate import capture_layer_inputs
from gqaprune.prune.plan import solve_counts
from gqaprune.prune.structure import ModelLayout, decoder_layers, q_rows

log = logging.getLogger(__name__)

ALLOCATIONS = ("scores", "sensitivity")
WEIGHT_BOUNDS = (0.5, 2.0)


def _head(model):
    base = getattr(model, "model", model)
    norm = getattr(base, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        raise GQAPruneError("--allocation sensitivity: the model has no final norm / output head where a "
                            "Llama-style causal LM has them (model.model.norm, lm_head)")
    return norm, head


def _loss(norm, head, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, tokens) of final hidden states ``h`` on ``ids``."""
    logits = head(norm(h))[:, :-1].float()
    tgt = ids[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    return float(nll), tgt.numel()


class _ZeroInputs:
    """Forward pre-hook that zeroes some input features of an nn.Linear (= removes those units)."""

    def __init__(self, lin, idx: torch.Tensor):
        self.idx = idx.to(lin.weight.device)
        self.h = lin.register_forward_pre_hook(self)

    def __call__(self, mod, args):
        x = args[0].clone()
        x[..., self.idx] = 0
        return (x,)

    def remove(self):
        self.h.remove()


def probe_counts(layout: ModelLayout, removed: int, pruned: list[int], min_mlp: int,
                 round_mlp_to: int | None) -> dict[int, tuple[int, int]]:
    """layer -> (KV groups, MLP channels) its probe removes: the uniform layout's per-layer counts.

    When the pruned layers already differ in shape (a per-layer-pruned source), each layer
    loses the same *fraction* of its parameters instead.
    """
    if all(layout.layers[i] == layout.layers[pruned[0]] for i in pruned):
        k, m = solve_counts(layout, removed, pruned, min_mlp, round_mlp_to)
        return {i: (k, m) for i in pruned}
    frac = removed / sum(layout.layers[i].n_kv * layout.group_params + layout.layers[i].n_mlp * layout.channel_params
                         for i in pruned)
    return {i: (min(layout.layers[i].n_kv - 1, round(frac * layout.layers[i].n_kv)),
                min(layout.layers[i].n_mlp - max(min_mlp, 1), round(frac * layout.layers[i].n_mlp))) for i in pruned}


@torch.no_grad()
def layer_sensitivity(model, layout: ModelLayout, scores: list[dict], ids: torch.Tensor, removed: int,
                      pruned: list[int], *, min_mlp: int = 1, round_mlp_to: int | None = None, batch_size: int = 8,
                      progress: bool = True) -> dict:
    """Per pruned layer: calibration-loss rise when it alone loses its lowest-scored units (see module doc)."""
    t0 = time.perf_counter()
    norm, head = _head(model)
    layers = decoder_layers(model)
    r, d = layout.q_per_kv, layout.head_dim
    counts = probe_counts(layout, removed, pruned, min_mlp, round_mlp_to)
    was = model.training
    model.eval()
    try:
        batches = capture_layer_inputs(model, ids, batch_size)
        kws = [kw for _, kw in batches]
        id_batches = [ids[b:b + batch_size] for b in range(0, ids.shape[0], batch_size)]
        # hidden states entering each layer (and after the last), per batch
        hs = [[h for h, _ in batches]]
        for layer in tqdm(layers, desc="sensitivity (dense pass)", disable=not progress, leave=False):
            hs.append([layer(h, **kw) for h, kw in zip(hs[-1], kws)])
        tot, n = 0.0, 0
        for h, x in zip(hs[-1], id_batches):
            a, b = _loss(norm, head, h, x)
            tot, n = tot + a, n + b
        base = tot / n
        hs.pop()  # the final states are not needed any more
        out = []
        for i in tqdm(pruned, desc="sensitivity (per layer)", disable=not progress):
            k, m = counts[i]
            kv_rm = torch.argsort(scores[i]["kv"].double(), stable=True)[:k].tolist()
            ch_rm = torch.argsort(scores[i]["mlp"].double(), stable=True)[:m]
            hooks = []
            if kv_rm:
                hooks.append(_ZeroInputs(layers[i].self_attn.o_proj, q_rows(sorted(kv_rm), r, d)))
            if m:
                hooks.append(_ZeroInputs(layers[i].mlp.down_proj, ch_rm))
            tot, n = 0.0, 0
            try:
                for j, x in enumerate(id_batches):
                    h = hs[i][j]
                    for layer in layers[i:]:
                        h = layer(h, **kws[j])
                    a, b = _loss(norm, head, h, x)
                    tot, n = tot + a, n + b
            finally:
                for hk in hooks:
                    hk.remove()
            out.append({"layer": i, "probe_kv_removed": k, "probe_mlp_removed": int(m), "loss": tot / n,
                        "delta": tot / n - base})
        del hs
    finally:
        model.train(was)
    rep = {"base_loss": base, "tokens": int(ids.numel()), "samples": int(ids.shape[0]), "layers": out,
           "seconds": round(time.perf_counter() - t0, 2)}
    w = sensitivity_weights(rep)
    for x in out:
        x["weight"] = w[x["layer"]]
    return rep


def sensitivity_weights(rep: dict) -> dict[int, float]:
    """layer -> clip(sqrt(delta / mean(delta)), *WEIGHT_BOUNDS) (see module doc); negative deltas count as 0.

    (The report keeps them per layer entry, as ``weight``: JSON has no integer keys.)
    """
    deltas = {x["layer"]: x["delta"] for x in rep["layers"]}
    pos = [max(v, 0.0) for v in deltas.values()]
    mean = sum(pos) / len(pos) if pos else 0.0
    if mean <= 0:  # no layer hurts: nothing to tell them apart
        return {i: 1.0 for i in deltas}
    lo, hi = WEIGHT_BOUNDS
    return {i: min(hi, max(lo, math.sqrt(max(v, 0.0) / mean))) for i, v in deltas.items()}


def summary_line(rep: dict) -> str:
    w = {x["layer"]: x["weight"] for x in rep["layers"]}
    ranked = sorted(w.items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{i} (x{v:.2f})" for i, v in ranked[:3])
    low = ", ".join(f"{i} (x{v:.2f})" for i, v in ranked[-3:])
    return (f"sensitivity allocation: calibration loss {rep['base_loss']:.3f} nats/token on {rep['tokens']:,} tokens; "
            f"most sensitive layers {top}; least {low}")
