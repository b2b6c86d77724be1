"""Layer sensitivity (``--allocation sensitivity``), measured on calibration data.

How much does pruning layer i *alone* cost? For every pruned layer, remove its
lowest-scored units at the counts the uniform layout would remove there (so every
layer is probed with the same share), run the model on a few calibration samples, and
measure how far its next-token distribution moves from the unpruned model's:

    kl_i    = mean over tokens of KL(p_dense || p_probe_i)       (nats per token)
    delta_i = loss(probe_i) - loss(dense)                       (reported beside it)

KL rather than the loss rise drives the allocation: it is never negative and, on the
few hundred tokens this can afford, far less noisy (the loss rise of a mildly pruned
layer is often below its noise and comes out negative). Each layer gets

    weight_i = clip(sqrt(kl_i / mean_j(kl_j)), 1/2, 2)

and the per-layer layout splits the attention and MLP totals over the layers in
proportion to (units in the layer) / weight_i (budget.py): a layer four times as
sensitive as the average gives up half the average share, one a quarter as sensitive
twice the average share; the scores still choose which units within a layer. The square
root and the bounds are deliberate: the probe measures one share per layer, and a
steeper rule extrapolates far beyond it. The KLs, loss rises, weights and the resulting
counts go into the plan's provenance, so the allocation can be read and argued with.

Cost: the hidden states entering every layer are computed once and kept (layers x
tokens x hidden), as are the dense log-probabilities (tokens x vocabulary, float32),
so probing layer i reruns only layers i..L-1 and the head: about
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

from gqaprune.models.layout import ModelLayout
from gqaprune.prune.budget import solve_counts
from gqaprune.prune.layerwise import DenseTarget, Head, capture_layer_inputs, check_layers, remove_hooks, run_layers, \
    zero_units

log = logging.getLogger(__name__)

WEIGHT_BOUNDS = (0.5, 2.0)


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
    head = Head(model, "--allocation sensitivity")
    layers = check_layers(model, "--allocation sensitivity")
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
        for li, layer in enumerate(tqdm(layers, desc="sensitivity (dense pass)", disable=not progress, leave=False)):
            hs.append([layer(h, **kw[li]) for h, kw in zip(hs[-1], kws)])
        last = hs.pop()                                # the final states are not needed after this
        ref = [DenseTarget(head, h) for h in last]
        n = sum(x.shape[0] * (x.shape[1] - 1) for x in id_batches)
        base = sum(r.nll_kl(h, x)[0] for r, h, x in zip(ref, last, id_batches)) / n
        del last
        out = []
        for i in tqdm(pruned, desc="sensitivity (per layer)", disable=not progress):
            k, m = counts[i]
            kv_rm = torch.argsort(scores[i]["kv"].double(), stable=True)[:k].tolist()
            ch_rm = torch.argsort(scores[i]["mlp"].double(), stable=True)[:m]
            hooks = zero_units(layers[i], kv_rm, ch_rm, r, d)
            nll_sum, kl_sum = 0.0, 0.0
            try:
                for j, x in enumerate(id_batches):
                    h = run_layers(layers, hs[i][j], kws[j], start=i)
                    nll_j, kl_j = ref[j].nll_kl(h, x)
                    nll_sum += nll_j
                    kl_sum += kl_j
            finally:
                remove_hooks(hooks)
            out.append({"layer": i, "probe_kv_removed": k, "probe_mlp_removed": int(m), "kl": kl_sum / n,
                        "loss": nll_sum / n, "delta": nll_sum / n - base})
        del hs, ref
    finally:
        model.train(was)
    rep = {"base_loss": base, "tokens": int(ids.numel()), "samples": int(ids.shape[0]), "layers": out,
           "seconds": round(time.perf_counter() - t0, 2)}
    w = sensitivity_weights(rep)
    for x in out:
        x["weight"] = w[x["layer"]]
    return rep


def sensitivity_weights(rep: dict) -> dict[int, float]:
    """layer -> clip(sqrt(kl / mean(kl)), *WEIGHT_BOUNDS) (see module doc).

    (The report keeps them per layer entry, as ``weight``: JSON has no integer keys.)
    """
    kls = {x["layer"]: max(x["kl"], 0.0) for x in rep["layers"]}
    mean = sum(kls.values()) / len(kls) if kls else 0.0
    if mean <= 0:  # no layer moves the output: nothing to tell them apart
        return {i: 1.0 for i in kls}
    lo, hi = WEIGHT_BOUNDS
    return {i: min(hi, max(lo, math.sqrt(v / mean))) for i, v in kls.items()}


def summary_line(rep: dict) -> str:
    w = {x["layer"]: x["weight"] for x in rep["layers"]}
    ranked = sorted(w.items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{i} (x{v:.2f})" for i, v in ranked[:3])
    low = ", ".join(f"{i} (x{v:.2f})" for i, v in ranked[-3:])
    return (f"sensitivity allocation (KL of each layer's probe on {rep['tokens']:,} calibration tokens): most "
            f"sensitive layers {top}; least {low} (weight w: the layer gives up 1/w of the average fraction)")
