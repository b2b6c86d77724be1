"""Block-wise reconstruction (``--reconstruct-epochs E``): train each pruned decoder layer to match its dense self.

``--compensate`` refits only the o_proj / down_proj columns that read the kept units, in closed
form. This goes further: after the cut, every weight the pruned layer still has (q/k/v/o,
gate/up/down, its norms) is trained with Adam so that the layer's output matches the *dense*
layer's output on the same inputs, one layer at a time, in order:

    h_p      (samples x tokens x hidden)   hidden states entering layer i in the pruned model
                                            (earlier layers already reconstructed)
    target   dense_layer_i(h_p)             what the unpruned layer makes of them (SparseGPT's
                                            layer objective, as ``--compensate-target layer``)
    loss     ||pruned_layer_i(h_p) - target||^2 / ||target - h_p||^2   per batch; the residual
                                            h_p is common to both, so the error is measured
                                            against the size of the layer's own update

The ``dense`` model is a separate, unmodified copy (``--compensate`` refits the model it prunes
in place, so the one that was pruned is no longer dense). Memory: the hidden states and targets
of the calibration samples (two copies of samples x tokens x hidden, as compensation holds), one
layer's float32 training copy and its Adam state.

Overfitting guard, as for the refit (docs/architecture.md, "Measuring quality"): the last
``holdout`` fraction of the calibration samples is never trained on; a layer whose held-out error
is not lower after training gets its weights back as they were.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
from tqdm.auto import tqdm

from gqaprune.errors import GQAPruneError
from gqaprune.prune.compensate import _split
from gqaprune.prune.layerwise import capture_layer_inputs, check_layers

log = logging.getLogger(__name__)


def _rel_error(layer, hs, ts, kws, i: int) -> float | None:
    """sum ||layer(h) - t||^2 / sum ||t - h||^2 over the batches (float64 sums)."""
    if not hs:
        return None
    num = den = 0.0
    with torch.no_grad():
        for h, t, kw in zip(hs, ts, kws):
            out = layer(h.to(t.dtype), **kw[i])
            num += float((out - t).double().pow(2).sum())
            den += float((t - h.to(t.dtype)).double().pow(2).sum())
    return num / max(den, 1e-30)


def _train_layer(layer, hs, ts, kws, i: int, *, epochs: int, lr: float) -> None:
    """Adam on every parameter of ``layer`` (float32), cosine learning rate over ``epochs`` passes."""
    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    total = max(1, epochs * len(hs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    with torch.enable_grad():
        for _ in range(epochs):
            for h, t, kw in zip(hs, ts, kws):
                out = layer(h, **kw[i])
                loss = (out - t).pow(2).sum() / (t - h).pow(2).sum().clamp_min(1e-30)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def reconstruct(pruned, dense, ids: torch.Tensor, *, epochs: int, lr: float, holdout: float = 0.125,
                batch_size: int = 8, progress: bool = True) -> dict:
    """Train ``pruned``'s decoder layers in place towards ``dense``'s (same depth); returns the report."""
    if ids is None or ids.ndim != 2 or ids.shape[0] < 1:
        raise GQAPruneError("--reconstruct-epochs needs calibration token ids (samples x tokens)")
    layers, dlayers = check_layers(pruned, "--reconstruct-epochs"), check_layers(dense, "--reconstruct-epochs")
    if len(layers) != len(dlayers):
        raise GQAPruneError(f"--reconstruct-epochs: the pruned model has {len(layers)} layers, the dense one "
                            f"{len(dlayers)}; reconstruct against the model it was pruned from")
    t0 = time.perf_counter()
    n_held = _split(ids.shape[0], holdout)
    fit_ids, held_ids = ids[: ids.shape[0] - n_held], ids[ids.shape[0] - n_held:]
    fit = capture_layer_inputs(pruned, fit_ids, batch_size)
    held = capture_layer_inputs(pruned, held_ids, batch_size) if n_held else []
    kws = [b[1] for b in fit] + [b[1] for b in held]
    hs = [b[0] for b in fit] + [b[0] for b in held]     # pruned hidden states entering layer i, per batch
    n_fit = len(fit)
    was = pruned.training
    pruned.eval()
    report = []
    try:
        for i, layer in enumerate(tqdm(layers, desc="reconstruct (layer)", disable=not progress)):
            dtype = next(layer.parameters()).dtype
            with torch.no_grad():
                ts = [dlayers[i](h, **kw[i]).float() for h, kw in zip(hs, kws)]
            saved = copy.deepcopy(layer.state_dict())
            layer.float()
            hf = [h.float() for h in hs]
            rec = {"layer": i, "err_before": _rel_error(layer, hf[:n_fit], ts[:n_fit], kws, i),
                   "heldout_before": _rel_error(layer, hf[n_fit:], ts[n_fit:], kws, i)}
            _train_layer(layer, hf[:n_fit], ts[:n_fit], kws[:n_fit], i, epochs=epochs, lr=lr)
            rec["err_after"] = _rel_error(layer, hf[:n_fit], ts[:n_fit], kws, i)
            rec["heldout_after"] = _rel_error(layer, hf[n_fit:], ts[n_fit:], kws, i)
            rec["kept"] = rec["heldout_after"] is None or rec["heldout_after"] < rec["heldout_before"]
            layer.to(dtype)
            if not rec["kept"]:
                layer.load_state_dict(saved)
            with torch.no_grad():
                hs = [layer(h, **kw[i]) for h, kw in zip(hs, kws)]
            report.append(rec)
            del ts, hf, saved
    finally:
        pruned.train(was)
    rep = {"epochs": epochs, "lr": lr, "samples_fit": int(fit_ids.shape[0]), "samples_heldout": n_held,
           "tokens_fit": int(fit_ids.numel()), "tokens_heldout": int(held_ids.numel()),
           "seconds": round(time.perf_counter() - t0, 2), "layers": report}
    rep["summary"] = summarize(rep)
    log.info("reconstruction: %s", summary_line(rep))
    return rep


def summarize(rep: dict) -> dict:
    def mean(key):
        xs = [x[key] for x in rep["layers"] if x.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    after = [x["heldout_after"] if x["kept"] else x["heldout_before"] for x in rep["layers"]
             if x.get("heldout_before") is not None]
    return {"err_before": mean("err_before"), "err_after": mean("err_after"), "heldout_before": mean("heldout_before"),
            "heldout_after": sum(after) / len(after) if after else None,
            "kept": sum(bool(x["kept"]) for x in rep["layers"]), "layers": len(rep["layers"])}


def summary_line(rep: dict) -> str:
    s = rep.get("summary") or summarize(rep)

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    return (f"block-wise reconstruction ({rep['epochs']} epochs, Adam lr {rep['lr']:g}): layer output error vs the "
            f"dense layer {f(s['err_before'])} -> {f(s['err_after'])} (held-out {f(s['heldout_before'])} -> "
            f"{f(s['heldout_after'])}); {s['kept']}/{s['layers']} layers kept the trained weights; "
            f"{rep['tokens_fit']:,} tokens fitted, {rep['tokens_heldout']:,} held out; {rep['seconds']:.0f} s")
