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

Overfitting guard (DESIGN.md "Measuring quality"): the last ``holdout`` fraction of the
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
from gqaprune.prune.plan import PrunePlan
from gqaprune.prune.structure import decoder_layers, model_layout, q_rows

log = logging.getLogger(__name__)

TARGETS = ("layer", "dense")
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)   # x mean(diag(X^T X)); chosen on held-out tokens
DEFAULT_RIDGE = 1e-2                                 # when nothing is held out


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


@torch.no_grad()
def capture_layer_inputs(model, ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Per batch: (hidden states entering decoder layer 0, the keyword arguments the layers get).

    The keyword arguments (rotary position embeddings, causal mask, position ids) are what
    the model passes each layer, captured so layers can be run one at a time.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    store: list[tuple[torch.Tensor, dict]] = []

    def hook(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        store.append((h.detach(), kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    was = model.training
    model.eval()
    try:
        for b in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[b:b + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was)
    return store


def _check_llama_layer(layer, i: int) -> None:
    need = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    missing = [n for n in need if not hasattr(layer, n)]
    if missing:
        raise GQAPruneError(f"--compensate: decoder layer {i} has no {', '.join(missing)}; compensation supports "
                            "Llama-style layers (pre-norm attention then pre-norm MLP)")


class _Capture:
    """A forward pre-hook that keeps the input of one nn.Linear."""

    def __init__(self, lin):
        self.x = None
        self.h = lin.register_forward_pre_hook(self)

    def __call__(self, mod, args):
        self.x = args[0].detach()

    def remove(self):
        self.h.remove()


def _attention(layer, h: torch.Tensor, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj input, attention output) of ``layer`` on hidden states ``h``."""
    cap = _Capture(layer.self_attn.o_proj)
    try:
        out = layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]
    finally:
        cap.remove()
    return cap.x, out


def _mlp(layer, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down_proj input, MLP output) of ``layer`` on the post-attention residual ``r``."""
    cap = _Capture(layer.mlp.down_proj)
    try:
        out = layer.mlp(layer.post_attention_layernorm(r))
    finally:
        cap.remove()
    return cap.x, out


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


@torch.no_grad()
def compensate(model, plan: PrunePlan, ids: torch.Tensor, *, target: str = "layer", ridge: float | None = None,
               holdout: float = 0.125, batch_size: int = 8, progress: bool = True) -> dict:
    """Refit ``model``'s o_proj / down_proj for ``plan`` in place; returns the per-layer report.

    ``model`` is the model the plan was made for (unpruned). Afterwards it computes what the
    pruned model computes (removed units' consuming columns are zero); pass it to
    ``apply_plan(model, plan)`` to slice. Sublayers that lose no unit are left bitwise as they were.
    """
    if target not in TARGETS:
        raise GQAPruneError(f"--compensate-target {target}: choose one of {', '.join(TARGETS)}")
    if ridge is not None and ridge < 0:
        raise GQAPruneError(f"--compensate-ridge {ridge}: must be >= 0")
    if ids is None or ids.ndim != 2 or ids.shape[0] < 1:
        raise GQAPruneError("--compensate needs calibration token ids (samples x tokens)")
    t0 = time.perf_counter()
    layout = model_layout(model)
    plan.check_matches(layout)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        _check_llama_layer(layer, i)
    r, d = layout.q_per_kv, layout.head_dim
    device = next(model.parameters()).device
    acc_dtype = torch.float32  # sums over <= ~1e6 tokens: float32 is plenty next to the ridge; 2x faster on CPU

    n_held = _split(ids.shape[0], holdout)
    fit_ids, held_ids = ids[: ids.shape[0] - n_held], ids[ids.shape[0] - n_held:]
    batches = [(h, kw, False) for h, kw in capture_layer_inputs(model, fit_ids, batch_size)]
    if n_held:
        batches += [(h, kw, True) for h, kw in capture_layer_inputs(model, held_ids, batch_size)]
    hp = [b[0] for b in batches]                       # pruned model's hidden states entering layer i
    hd = list(hp) if target == "dense" else None       # dense model's (target "dense" only)
    kws = [b[1] for b in batches]
    held_flags = [b[2] for b in batches]

    report_layers = []
    was = model.training
    model.eval()
    try:
        for i, layer in enumerate(tqdm(layers, desc=f"compensate ({target})", disable=not progress)):
            s = layout.layers[i]
            kv_keep, ch_keep = plan.kv_groups[i], plan.mlp_channels[i]
            kv_rm = [g for g in range(s.n_kv) if g not in set(kv_keep)]
            ch_rm_set = set(range(s.n_mlp)) - set(ch_keep)
            rec: dict = {"layer": i}
            if not kv_rm and not ch_rm_set and target == "layer":
                hp = [layer(h, **kw) for h, kw in zip(hp, kws)]
                report_layers.append(rec)
                continue
            # dense targets: the unpruned layer on the dense hidden states, before it is modified
            rd, hd_next = None, None
            if target == "dense":
                rd, hd_next = [], []
                for h, kw in zip(hd, kws):
                    _, a = _attention(layer, h, kw)
                    rd.append(h + a)
                    hd_next.append(rd[-1] + _mlp(layer, rd[-1])[1])

            # ---- attention: o_proj columns of the kept heads
            o = layer.self_attn.o_proj
            o_bias = o.bias.detach() if o.bias is not None else None
            o_ins = []
            if kv_rm:
                kept, removed = q_rows(kv_keep, r, d), q_rows(kv_rm, r, d)
                fit = LstsqStats(kept.numel(), o.out_features, device, acc_dtype)
                held = LstsqStats(kept.numel(), o.out_features, device, acc_dtype)
                kd = kept.to(device)
                for j, (h, kw) in enumerate(zip(hp, kws)):
                    x, out = _attention(layer, h, kw)
                    o_ins.append(x)
                    y = out if target == "layer" else rd[j] - h
                    if o_bias is not None:
                        y = y - o_bias
                    (held if held_flags[j] else fit).add(x.index_select(-1, kd), y)
                rec["attn"] = _refit(o, kept, removed, fit, held, ridge)
                del fit, held
                rp = [h + o(x) for h, x in zip(hp, o_ins)]
            else:
                rp = [h + _attention(layer, h, kw)[1] for h, kw in zip(hp, kws)]
            del o_ins

            # ---- MLP: down_proj columns of the kept channels, fed the refit attention's residual
            dn = layer.mlp.down_proj
            d_bias = dn.bias.detach() if dn.bias is not None else None
            if ch_rm_set:
                kept = torch.tensor(ch_keep, dtype=torch.long)
                removed = torch.tensor(sorted(ch_rm_set), dtype=torch.long)
                fit = LstsqStats(kept.numel(), dn.out_features, device, acc_dtype)
                held = LstsqStats(kept.numel(), dn.out_features, device, acc_dtype)
                kd = kept.to(device)
                xs = []
                for j, rj in enumerate(rp):
                    x, out = _mlp(layer, rj)
                    xk = x.index_select(-1, kd)
                    xs.append(xk)  # kept channels only: tokens x kept width, for the output below
                    y = out if target == "layer" else hd_next[j] - rj
                    if d_bias is not None:
                        y = y - d_bias
                    (held if held_flags[j] else fit).add(xk, y)
                rec["mlp"] = _refit(dn, kept, removed, fit, held, ridge)
                del fit, held
                w_k = dn.weight.index_select(1, kd)
                hp = [rj + torch.nn.functional.linear(xk, w_k, dn.bias) for rj, xk in zip(rp, xs)]
                del xs, w_k
            else:
                hp = [rj + _mlp(layer, rj)[1] for rj in rp]
            del rp
            if target == "dense":
                hd = hd_next
            report_layers.append(rec)
    finally:
        model.train(was)

    n_fit = int(fit_ids.numel())
    rep = {"target": target, "ridge": "auto (held-out)" if ridge is None and n_held else
           (DEFAULT_RIDGE if ridge is None else ridge), "tokens_fit": n_fit, "tokens_heldout": int(held_ids.numel()),
           "samples_fit": int(fit_ids.shape[0]), "samples_heldout": n_held, "seconds": round(time.perf_counter() - t0, 2),
           "layers": report_layers}
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


# ---------------------------------------------------------------------- compensation-aware scores
OBS_DAMP = 1e-2  # x mean(diag(X^T X)), as SparseGPT's percdamp


OBS_ROUNDS = 32  # greedy removal in at most this many rounds (one Gram-inverse update per round)


def greedy_obs_order(w: torch.Tensor, gram: torch.Tensor, group: int, damp: float = OBS_DAMP,
                     rounds: int = OBS_ROUNDS) -> torch.Tensor:
    """Scores from greedy structured OBS on one consuming projection: lower = removed earlier.

    ``w`` (out x n): the projection reading the units; ``gram`` (n x n): X^T X of its input;
    units are ``group`` consecutive columns. Each round removes the units whose removal, with
    the remaining columns refit by least squares, raises ||Y - X W'^T||^2 least
    (cost of unit u = tr(W_u [H^-1]_uu^-1 W_u^T), H = X^T X + damp), then updates W and
    H^-1 as if they were gone (Optimal Brain Surgeon, blockwise; as in ZipLM / SlimGPT).
    Units are removed ``ceil(units / rounds)`` at a time (one at a time when there are at
    most ``rounds`` units, e.g. KV groups), which keeps the cost at ``rounds`` updates of
    H^-1 instead of one per unit. A unit's score is the running maximum of the costs at its
    removal, so a unit kept longer scores at least as high; the last one scores highest.
    """
    n = gram.shape[0]
    units = n // group
    g = gram.to(torch.float64)
    lam = damp * float(g.diagonal().mean()) or 1e-12
    g = g + lam * torch.eye(n, dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    hinv = torch.cholesky_solve(eye, chol) if int(info) == 0 else torch.linalg.pinv(g)
    wk = w.to(torch.float64).clone()
    alive = torch.ones(units, dtype=torch.bool)
    score = torch.zeros(units, dtype=torch.float64)
    chunk = max(1, -(-units // rounds))
    running = 0.0
    while int(alive.sum()) > 1:
        idx = alive.nonzero().flatten()
        if group == 1:
            costs = ((wk * wk).sum(0) / hinv.diagonal().clamp_min(1e-30)).cpu()[idx]
        else:
            costs = torch.stack([(wk[:, u * group:(u + 1) * group]
                                  @ torch.linalg.solve(hinv[u * group:(u + 1) * group, u * group:(u + 1) * group],
                                                       wk[:, u * group:(u + 1) * group].T)).trace()
                                 for u in idx.tolist()]).cpu()
        take = torch.argsort(costs, stable=True)[: min(chunk, len(idx) - 1)]
        for j in take.tolist():
            running = max(running, float(costs[j]))
            score[int(idx[j])] = running
        gone = idx[take]
        alive[gone] = False
        cols = torch.cat([torch.arange(int(u) * group, (int(u) + 1) * group) for u in gone]).to(wk.device)
        # remove the chunk at once: W -= W_S [H^-1]_SS^-1 [H^-1]_S: ; H^-1 -= [H^-1]_:S [H^-1]_SS^-1 [H^-1]_S:
        # (rows and columns S of H^-1 and columns S of W become zero, up to rounding)
        rows = torch.linalg.inv(hinv[cols][:, cols]) @ hinv[cols, :]
        wk -= wk[:, cols] @ rows
        hinv -= hinv[:, cols] @ rows
        hinv[:, cols] = 0                  # rounding leftovers must not pose as cheap units later
        hinv[cols, cols] = 1.0
        wk[:, cols] = 0
    score[alive] = running * 2 + 1.0
    return score.float()


@torch.no_grad()
def obs_scores(model, layout, ids: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Per layer {'kv', 'mlp'} scores from greedy structured OBS on o_proj / down_proj (criterion ``obs``).

    One pass through the layers on the calibration tokens (the model's own activations),
    accumulating each consuming projection's input Gram matrix, one layer at a time.
    """
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        _check_llama_layer(layer, i)
    device = next(model.parameters()).device
    batches = capture_layer_inputs(model, ids, batch_size)
    hs, kws = [h for h, _ in batches], [kw for _, kw in batches]
    group = layout.q_per_kv * layout.head_dim
    out = []
    was = model.training
    model.eval()
    try:
        for i, layer in enumerate(tqdm(layers, desc="score (obs)", disable=not progress)):
            o, dn = layer.self_attn.o_proj, layer.mlp.down_proj
            g_o = torch.zeros(o.in_features, o.in_features, device=device, dtype=torch.float32)
            g_d = torch.zeros(dn.in_features, dn.in_features, device=device, dtype=torch.float32)
            nxt = []
            for h, kw in zip(hs, kws):
                x, a = _attention(layer, h, kw)
                x = x.reshape(-1, x.shape[-1]).float()
                g_o.addmm_(x.T, x)
                r = h + a
                xd, m = _mlp(layer, r)
                xd = xd.reshape(-1, xd.shape[-1]).float()
                g_d.addmm_(xd.T, xd)
                nxt.append(r + m)
            hs = nxt
            out.append({"kv": greedy_obs_order(o.weight, g_o, group).cpu(),
                        "mlp": greedy_obs_order(dn.weight, g_d, 1).cpu()})
    finally:
        model.train(was)
    return out
