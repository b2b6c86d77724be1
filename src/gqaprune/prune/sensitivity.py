"""Measured on calibration data: layer sensitivity (``--allocation sensitivity``) and the
attention / MLP split (``--split search``).

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
proportion to (units in the layer) / weight_i (plan.py): a layer four times as
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

Split search. By default attention and MLP lose the same fraction of their units
(plan.py). Per parameter they are not equally important (on SmolLM2-135M at 20%, removing
only MLP channels gave a lower perplexity than one KV group in three per layer plus
fewer channels), so ``--split search`` tries every share of KV groups removed (0, 1/n_kv,
2/n_kv, ...; the MLP takes the rest of the budget), measures each whole plan's KL from
the dense model on the same few calibration samples (one forward pass each), and keeps
the lowest. The candidates and their KLs go into the provenance.
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

ALLOCATIONS = ("scores", "sensitivity", "search")   # search: allocation_search.py
WEIGHT_BOUNDS = (0.5, 2.0)


def _head(model):
    base = getattr(model, "model", model)
    norm = getattr(base, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        raise GQAPruneError("--allocation sensitivity: the model has no final norm / output head where a "
                            "Llama-style causal LM has them (model.model.norm, lm_head)")
    return norm, head


def _logprobs(norm, head, h: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float32) at every position but the last."""
    return torch.log_softmax(head(norm(h))[:, :-1].float(), dim=-1)


def _nll(logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of ``ids`` under ``logp``."""
    tgt = ids[:, 1:].to(logp.device)
    return -float(logp.gather(-1, tgt[..., None]).sum())


def _kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Summed KL(ref || this) over positions."""
    return float((logp_ref.exp() * (logp_ref - logp)).sum())


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


def zero_units(layer, kv_rm, ch_rm, r: int, d: int) -> list[_ZeroInputs]:
    """Hooks that remove KV groups ``kv_rm`` and MLP channels ``ch_rm`` from ``layer`` (weights untouched)."""
    hooks = []
    if len(kv_rm):
        hooks.append(_ZeroInputs(layer.self_attn.o_proj, q_rows(sorted(kv_rm), r, d)))
    if len(ch_rm):
        hooks.append(_ZeroInputs(layer.mlp.down_proj, torch.as_tensor(ch_rm, dtype=torch.long)))
    return hooks


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
        ref = [_logprobs(norm, head, h) for h in hs.pop()]     # the final states are not needed any more
        n = sum(x.shape[0] * (x.shape[1] - 1) for x in id_batches)
        base = sum(_nll(lp, x) for lp, x in zip(ref, id_batches)) / n
        out = []
        for i in tqdm(pruned, desc="sensitivity (per layer)", disable=not progress):
            k, m = counts[i]
            kv_rm = torch.argsort(scores[i]["kv"].double(), stable=True)[:k].tolist()
            ch_rm = torch.argsort(scores[i]["mlp"].double(), stable=True)[:m]
            hooks = zero_units(layers[i], kv_rm, ch_rm, r, d)
            nll, kl = 0.0, 0.0
            try:
                for j, x in enumerate(id_batches):
                    h = hs[i][j]
                    for layer in layers[i:]:
                        h = layer(h, **kws[j])
                    lp = _logprobs(norm, head, h)
                    nll += _nll(lp, x)
                    kl += _kl(ref[j], lp)
            finally:
                for hk in hooks:
                    hk.remove()
            out.append({"layer": i, "probe_kv_removed": k, "probe_mlp_removed": int(m), "kl": kl / n,
                        "loss": nll / n, "delta": nll / n - base})
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


# ---------------------------------------------------------------------- attention / MLP split
SPLITS = ("balanced", "search")


class DenseReference:
    """The unpruned model's next-token log-probabilities on a few calibration samples, kept for comparisons."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.batches = [ids[b:b + batch_size] for b in range(0, ids.shape[0], batch_size)]
        self.ref = [self._logprobs(x) for x in self.batches]
        self.tokens = sum(x.shape[0] * (x.shape[1] - 1) for x in self.batches)

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
            kl = sum(_kl(ref, self._logprobs(x)) for ref, x in zip(self.ref, self.batches))
        finally:
            for hk in hooks:
                hk.remove()
            self.model.train(was)
        return kl / self.tokens


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
        kl = ref.plan_kl(plan, layout)
        kv_rm = sum(s.n_kv for s in layout.layers) - sum(plan.kept_kv)
        mlp_rm = sum(s.n_mlp for s in layout.layers) - sum(plan.kept_mlp)
        cands.append({"kv_fraction": round(f, 4), "kv_groups_removed": kv_rm, "mlp_channels_removed": mlp_rm,
                      "params_after": plan.provenance["params_after"], "kl": kl})
        log.info("split: %.0f%% of KV groups removed -> KL %.4f", 100 * f, kl)
        if best is None or kl < best[1]:
            best = (plan, kl, f)
    if best is None:
        raise GQAPruneError("--split search: no share of KV groups fits the budget; use --split balanced")
    rep = {"mode": "search", "tokens": ref.tokens, "candidates": cands, "chosen_kv_fraction": round(best[2], 4),
           "seconds": round(time.perf_counter() - t0, 2)}
    return best[0], rep
