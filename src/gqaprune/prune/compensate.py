"""Error compensation (``--compensate``): refit the weights that read the kept units.

After a plan removes KV groups and MLP channels from a layer, the layer's output
changes. The only weights that *consume* the kept units are o_proj's columns of the
kept heads and down_proj's columns of the kept channels; for them the best fit is a
linear least-squares problem with a closed form. For each pruned sublayer:

    X  (tokens x kept inputs)   o_proj input restricted to the kept heads' columns, or
                                act(gate) * up restricted to the kept channels
    Y  (tokens x hidden)        the target (below), bias removed
    W  (hidden x kept inputs)   the kept columns as they are
    W' = argmin ||Y - X W'^T||^2 + lam ||W' - W||^2
       -> W'^T = (X^T X + lam I)^-1 (X^T Y + lam W^T)
    lam = ridge * mean(diag(X^T X))               (scale-free: relative to the inputs' energy)

The ridge pulls towards the weights as they are, not towards zero: a large ridge means
"no refit", a small one the plain least-squares fit, and nothing in between shrinks the
layer. Calibration sets are small next to the widths (SmolLM2's MLP keeps ~1,200
channels; 4k tokens fit it almost perfectly and generalise poorly), so by default the
ridge is chosen per sublayer from RIDGE_GRID by the error on the held-out calibration
tokens (below); ``ridge=<number>`` fixes it instead.

Only ``X^T X``, ``X^T Y`` and ``||Y||^2`` are accumulated, batch by batch (float32; the
solve and the errors are computed in float64), so no activation matrix over all
calibration tokens is ever stored; the reconstruction errors before and after the refit
follow from the same three quantities in closed form.

Sequential, like SparseGPT / Wanda's layer-wise pipeline: layers are processed in order
and each layer is fed the *partially pruned* model's own hidden states (with the refit
weights of all earlier layers), so later layers also learn to absorb earlier errors.

Targets (``target``):
  ``layer``  the unpruned projection's output on the same (pruned-model) inputs: each
             sublayer is made to behave like its dense self (SparseGPT's objective);
  ``dense``  the dense model's own residual stream: the refit sublayer's output is asked to
             bring the pruned residual stream back to the dense one, so it also corrects
             drift that earlier layers left behind.

Overfitting guard (docs/architecture.md, "Measuring quality"): the last ``holdout`` fraction of the
calibration samples is not fitted; its errors are reported beside the fitted ones, the
automatic ridge is the one with the lowest held-out error (so that error is slightly
optimistic: one number picked from RIDGE_GRID), and a refit that makes the held-out
error worse than no refit is rejected (weights kept as sliced).

In-place and memory-light: the model is modified as it goes: the removed units' o_proj /
down_proj columns are zeroed (which removes them exactly, see tests) and the kept
columns get the refit weights; ``apply_plan`` afterwards slices the zeroed units away.
So the weights are held once; extra memory is the calibration hidden states (tokens x
hidden, two copies, three with ``target=dense``), one sublayer's inputs (tokens x
n_q*head_dim, then tokens x MLP width) and one Gram matrix: for Llama-3-8B's MLP,
14336^2 float32 = 0.82 GB on a GPU (float64 on CPU), plus float64 for the solve (1.6 GB).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import model_layout, q_rows
from gqaprune.prune.layerwise import Sublayers, capture_layer_inputs
from gqaprune.prune.plan import PrunePlan

log = logging.getLogger(__name__)

TARGETS = ("layer", "dense")
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)   # x mean(diag(X^T X)); chosen on held-out tokens
DEFAULT_RIDGE = 1e-2                                 # when nothing is held out


def check_target(fam, target: str) -> None:
    """Refuse a refit target that is unknown, or not defined for the model's family."""
    if target not in TARGETS:
        raise GQAPruneError(f"--compensate-target {target}: choose one of {', '.join(TARGETS)}")
    if target == "dense" and fam.sandwich:
        raise GQAPruneError(f"--compensate-target dense is not defined for {fam.label}: its norm after o_proj / "
                            "down_proj makes the residual it should restore a non-linear function of the refit "
                            "weights; use --compensate-target layer (the pre-norm output of each dense sublayer)")


class LstsqStats:
    """Streaming sums for min ||Y - X B^T||: X^T X, X^T Y, ||Y||^2, token count."""

    def __init__(self, n_in: int, n_out: int, device, dtype):
        self.xtx = torch.zeros(n_in, n_in, device=device, dtype=dtype)
        self.xty = torch.zeros(n_in, n_out, device=device, dtype=dtype)
        self.yy = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.dtype)
        y = y.reshape(-1, y.shape[-1]).to(self.xtx.dtype)
        self.xtx.addmm_(x.T, x)
        self.xty.addmm_(x.T, y)
        self.yy += float((y * y).sum())
        self.n += x.shape[0]

    def rel_error(self, w: torch.Tensor) -> float | None:
        """||Y - X w^T|| / ||Y|| from the sums alone (w: n_out x n_in)."""
        if self.n == 0 or self.yy <= 0:
            return None
        w = w.to(torch.float64)
        xtx, xty = self.xtx.to(torch.float64), self.xty.to(torch.float64)
        sq = self.yy - 2 * float((w * xty.T).sum()) + float(((w @ xtx) * w).sum())
        return math.sqrt(max(sq, 0.0) / self.yy)

    def solve(self, ridge: float, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(W' of shape n_out x n_in, the lambda used), in float64; the ridge pulls towards ``prior``."""
        a = self.xtx.to(torch.float64)
        lam = ridge * float(a.diagonal().mean())
        if lam <= 0:
            lam = 1e-12
        a = a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        b = self.xty.to(torch.float64)
        if prior is not None:
            b = b + lam * prior.to(device=b.device, dtype=torch.float64).T
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            sol = torch.cholesky_solve(b, chol)
        else:  # not positive definite in floating point: fall back to a least-squares solve
            sol = torch.linalg.lstsq(a, b).solution
        return sol.T.contiguous(), lam


def _refit(lin, kept: torch.Tensor, removed: torch.Tensor, fit: LstsqStats, held: LstsqStats,
           ridge: float | None) -> dict:
    """Solve, judge on held-out tokens, write the weights (kept columns) and zero the removed columns."""
    w = lin.weight.data
    w_kept = w.index_select(1, kept.to(w.device)).to(torch.float64)
    if ridge is None and held.n:  # choose the ridge on the held-out tokens
        trials = []
        for rg in RIDGE_GRID:
            cand, lam = fit.solve(rg, w_kept)
            e = held.rel_error(cand)
            trials.append((math.inf if e is None else e, rg, lam, cand))
        err, rg, lam, new = min(trials, key=lambda t: (t[0], -t[1]))
        ridge_used = rg
    else:
        ridge_used = DEFAULT_RIDGE if ridge is None else ridge
        new, lam = fit.solve(ridge_used, w_kept)
    rec = {"inputs_kept": int(kept.numel()), "inputs_removed": int(removed.numel()), "ridge": ridge_used,
           "lambda": lam, "err_before": fit.rel_error(w_kept), "err_after": fit.rel_error(new),
           "heldout_before": held.rel_error(w_kept), "heldout_after": held.rel_error(new),
           "weight_change": float((new - w_kept).norm() / w_kept.norm().clamp_min(1e-30))}
    ok = torch.isfinite(new).all().item()
    if not ok:
        rec["refit"], rec["why_not"] = False, "non-finite solution"
    elif rec["heldout_after"] is not None and rec["heldout_after"] > rec["heldout_before"]:
        rec["refit"], rec["why_not"] = False, "held-out error would rise (overfit)"
    elif rec["err_after"] is not None and rec["err_before"] is not None and rec["err_after"] > rec["err_before"]:
        rec["refit"], rec["why_not"] = False, "fitted error would rise"
    else:
        rec["refit"] = True
    if rec["refit"]:
        w[:, kept.to(w.device)] = new.to(device=w.device, dtype=w.dtype)
    w[:, removed.to(w.device)] = 0
    return rec


def _split(n_samples: int, holdout: float) -> int:
    """Number of calibration samples held out (the last ones)."""
    if not 0 <= holdout < 1:
        raise GQAPruneError(f"--compensate-holdout {holdout}: must be in [0, 1), the fraction of calibration "
                            "samples kept out of the fit to check it")
    if holdout == 0 or n_samples < 2:
        return 0
    return min(n_samples - 1, max(1, round(n_samples * holdout)))


class _Sublayers:
    """The calibration batches of one compensation run and the refit of one sublayer at a time.

    ``hp``: the pruned model's hidden states entering the current layer, per batch; ``kws`` the
    layer keyword arguments; ``held[j]``: batch j is held out of the fit (it only checks it).
    """

    def __init__(self, sub: Sublayers, batches, target: str, ridge: float | None, device):
        self.sub = sub
        self.kws = [b[1] for b in batches]   # per batch: each layer's keyword arguments
        self.i = 0                           # the layer being refit
        self.held = [b[2] for b in batches]
        self.target, self.ridge, self.device = target, ridge, device
        self.acc_dtype = torch.float32  # sums over <= ~1e6 tokens: float32 is plenty next to the ridge; 2x faster on CPU

    def _refit(self, lin, kept: torch.Tensor, removed: torch.Tensor, pairs) -> dict:
        """Accumulate (kept inputs, target output) pairs per batch into fit/held-out sums, then refit ``lin``."""
        fit = LstsqStats(kept.numel(), lin.out_features, self.device, self.acc_dtype)
        held = LstsqStats(kept.numel(), lin.out_features, self.device, self.acc_dtype)
        bias = lin.bias.detach() if lin.bias is not None else None
        for j, (x_kept, y) in enumerate(pairs):
            (held if self.held[j] else fit).add(x_kept, y if bias is None else y - bias)
        return _refit(lin, kept, removed, fit, held, self.ridge)

    def _attn_residual(self, layer, h, kw):
        return self.sub.add_attention(layer, h, self.sub.attention(layer, h, kw)[1])

    def _mlp_residual(self, layer, r):
        return self.sub.add_mlp(layer, r, self.sub.mlp(layer, r)[1])

    def dense(self, layer, hd):
        """(post-attention residuals, layer outputs) of the unpruned layer on the dense hidden states."""
        rd, hd_next = [], []
        for h, kws in zip(hd, self.kws):
            rd.append(self._attn_residual(layer, h, kws[self.i]))
            hd_next.append(self._mlp_residual(layer, rd[-1]))
        return rd, hd_next

    def attention(self, layer, hp, kv_keep, kv_rm, r: int, d: int, rd) -> tuple[list, dict | None]:
        """Refit o_proj's columns of the kept heads; returns the post-attention residuals and the record.

        Target ``layer``: the unpruned o_proj's output, before any norm that follows it (Gemma's
        post-attention norm makes the layer output scale-invariant, so the refit matches the
        pre-norm output the dense layer feeds that norm).
        """
        if not kv_rm:
            return [self._attn_residual(layer, h, kws[self.i]) for h, kws in zip(hp, self.kws)], None
        o = layer.self_attn.o_proj
        kept, removed = q_rows(kv_keep, r, d), q_rows(kv_rm, r, d)
        kd = kept.to(self.device)
        o_ins = []

        def pairs():
            for j, (h, kws) in enumerate(zip(hp, self.kws)):
                x, out = self.sub.attention(layer, h, kws[self.i])
                o_ins.append(x)
                yield x.index_select(-1, kd), (out if self.target == "layer" else rd[j] - h)

        rec = self._refit(o, kept, removed, pairs())
        return [self.sub.add_attention(layer, h, o(x)) for h, x in zip(hp, o_ins)], rec

    def mlp(self, layer, rp, ch_keep, ch_rm, hd_next) -> tuple[list, dict | None]:
        """Refit down_proj's columns of the kept channels, fed the refit attention's residuals (target as above)."""
        if not ch_rm:
            return [self._mlp_residual(layer, rj) for rj in rp], None
        dn = layer.mlp.down_proj
        kept = torch.tensor(ch_keep, dtype=torch.long)
        removed = torch.tensor(sorted(ch_rm), dtype=torch.long)
        kd = kept.to(self.device)
        xs = []   # kept channels only: tokens x kept width, for the output below

        def pairs():
            for j, rj in enumerate(rp):
                x, out = self.sub.mlp(layer, rj)
                xs.append(x.index_select(-1, kd))
                yield xs[-1], (out if self.target == "layer" else hd_next[j] - rj)

        rec = self._refit(dn, kept, removed, pairs())
        w_k = dn.weight.index_select(1, kd)
        return [self.sub.add_mlp(layer, rj, torch.nn.functional.linear(xk, w_k, dn.bias))
                for rj, xk in zip(rp, xs)], rec


@torch.no_grad()
def compensate(model, plan: PrunePlan, ids: torch.Tensor, *, target: str = "layer", ridge: float | None = None,
               holdout: float = 0.125, batch_size: int = 8, progress: bool = True) -> dict:
    """Refit ``model``'s o_proj / down_proj for ``plan`` in place; returns the per-layer report.

    ``model`` is the model the plan was made for (unpruned). Afterwards it computes what the
    pruned model computes (removed units' consuming columns are zero); pass it to
    ``apply_plan(model, plan)`` to slice. Sublayers that lose no unit are left bitwise as they were.
    """
    sl = Sublayers(model, "--compensate")
    check_target(sl.fam, target)
    if ids is None or ids.ndim != 2 or ids.shape[0] < 1:
        raise GQAPruneError("--compensate needs calibration token ids (samples x tokens)")
    t0 = time.perf_counter()
    layout = model_layout(model)
    plan.check_matches(layout)
    layers = sl.layers
    n_held = _split(ids.shape[0], holdout)
    fit_ids, held_ids = ids[: ids.shape[0] - n_held], ids[ids.shape[0] - n_held:]
    batches = [(h, kw, False) for h, kw in capture_layer_inputs(model, fit_ids, batch_size)]
    if n_held:
        batches += [(h, kw, True) for h, kw in capture_layer_inputs(model, held_ids, batch_size)]
    sub = _Sublayers(sl, batches, target, ridge, next(model.parameters()).device)
    hp = [b[0] for b in batches]                       # pruned model's hidden states entering layer i
    hd = list(hp) if target == "dense" else None       # dense model's (target "dense" only)
    report_layers = []
    was = model.training
    model.eval()
    try:
        for i, layer in enumerate(tqdm(layers, desc=f"compensate ({target})", disable=not progress)):
            sub.i = i
            s = layout.layers[i]
            kv_rm = [g for g in range(s.n_kv) if g not in set(plan.kv_groups[i])]
            ch_rm = set(range(s.n_mlp)) - set(plan.mlp_channels[i])
            rec: dict = {"layer": i}
            if not kv_rm and not ch_rm and target == "layer":
                hp = [layer(h, **kws[i]) for h, kws in zip(hp, sub.kws)]
                report_layers.append(rec)
                continue
            # dense targets: the unpruned layer on the dense hidden states, before it is modified
            rd, hd_next = sub.dense(layer, hd) if target == "dense" else (None, None)
            rp, rec_attn = sub.attention(layer, hp, plan.kv_groups[i], kv_rm, layout.q_per_kv, layout.head_dim, rd)
            hp, rec_mlp = sub.mlp(layer, rp, plan.mlp_channels[i], ch_rm, hd_next)
            rec.update({k: v for k, v in (("attn", rec_attn), ("mlp", rec_mlp)) if v is not None})
            if target == "dense":
                hd = hd_next
            report_layers.append(rec)
    finally:
        model.train(was)
    rep = {"target": target, "ridge": "auto (held-out)" if ridge is None and n_held else
           (DEFAULT_RIDGE if ridge is None else ridge), "tokens_fit": int(fit_ids.numel()),
           "tokens_heldout": int(held_ids.numel()), "samples_fit": int(fit_ids.shape[0]), "samples_heldout": n_held,
           "seconds": round(time.perf_counter() - t0, 2), "layers": report_layers}
    rep["summary"] = summarize(rep)
    log.info("compensation: %s", rep["summary"])
    return rep


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rep: dict) -> dict:
    """Mean relative errors over the refit sublayers (before -> after, fitted and held-out)."""
    out = {"tokens_fit": rep["tokens_fit"], "tokens_heldout": rep["tokens_heldout"]}
    for kind in ("attn", "mlp"):
        recs = [x[kind] for x in rep["layers"] if kind in x]
        out[kind] = {
            "sublayers": len(recs), "refit": sum(bool(x["refit"]) for x in recs),
            "err_before": _mean(x["err_before"] for x in recs),
            "err_after": _mean(x["err_after"] if x["refit"] else x["err_before"] for x in recs),
            "heldout_before": _mean(x["heldout_before"] for x in recs),
            "heldout_after": _mean(x["heldout_after"] if x["refit"] else x["heldout_before"] for x in recs),
        }
    return out


def summary_line(rep: dict) -> str:
    """One line for the CLI: mean layer output error before -> after, fitted and held-out, token counts."""
    s = rep.get("summary") or summarize(rep)

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    parts = []
    for kind, name in (("attn", "o_proj"), ("mlp", "down_proj")):
        k = s[kind]
        if k["sublayers"]:
            parts.append(f"{name} error {f(k['err_before'])} -> {f(k['err_after'])} "
                         f"(held-out {f(k['heldout_before'])} -> {f(k['heldout_after'])}; "
                         f"{k['refit']}/{k['sublayers']} refit)")
    toks = f"{s['tokens_fit']:,} tokens fitted, {s['tokens_heldout']:,} held out"
    return f"compensation ({rep['target']}, ridge {rep['ridge']}): " + "; ".join(parts or ["nothing removed"]) \
        + f"; {toks}"
