"""Criterion ``obs``: units scored by how well the compensation's refit can replace them.

Greedy structured Optimal Brain Surgeon on each consuming projection (o_proj for KV
groups, down_proj for MLP channels), on the model's own calibration activations, as in
ZipLM / SlimGPT: a unit is cheap to remove when the remaining columns, refit by least
squares, reproduce the projection's output without it.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gqaprune.prune.layerwise import Sublayers, capture_layer_inputs

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
    sub = Sublayers(model, "--criterion obs")
    layers = sub.layers
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
                x, a = sub.attention(layer, h, kw[i])
                x = x.reshape(-1, x.shape[-1]).float()
                g_o.addmm_(x.T, x)
                r = sub.add_attention(layer, h, a)
                xd, m = sub.mlp(layer, r)
                xd = xd.reshape(-1, xd.shape[-1]).float()
                g_d.addmm_(xd.T, xd)
                nxt.append(sub.add_mlp(layer, r, m))
            hs = nxt
            out.append({"kv": greedy_obs_order(o.weight, g_o, group).cpu(),
                        "mlp": greedy_obs_order(dn.weight, g_d, 1).cpu()})
    finally:
        model.train(was)
    return out


class OBS:
    """Greedy structured OBS on o_proj / down_proj inputs (compensation-aware selection)."""

    name = "obs"
    needs_calibration = True

    def __call__(self, model, layout, ids, ctx) -> list[dict]:
        return obs_scores(model, layout, ids, batch_size=ctx.batch_size, progress=ctx.progress)
