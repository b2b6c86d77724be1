"""Criterion ``activation``: mean |input| of o_proj / down_proj times the L2 norm of the weight column,
summed per unit (Wanda's weight x activation statistic, at unit granularity)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gqaprune.memory import release_freed_memory
from gqaprune.models.layout import decoder_layers


@torch.no_grad()
def activation_means(model, ids: torch.Tensor, *, batch_size: int = 8, progress: bool = True):
    """Per layer: mean |x| of each input feature of o_proj and of down_proj over calibration tokens."""
    layers = decoder_layers(model)
    sums = [[None, None] for _ in layers]
    count = [0]
    handles = []
    for i, layer in enumerate(layers):
        for j, lin in enumerate((layer.self_attn.o_proj, layer.mlp.down_proj)):
            def hook(mod, inp, i=i, j=j):
                x = inp[0].detach().float().abs().reshape(-1, inp[0].shape[-1]).sum(0)
                sums[i][j] = x if sums[i][j] is None else sums[i][j] + x
            handles.append(lin.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    body = model.get_decoder() or model
    was = model.training
    model.eval()
    try:
        for b in tqdm(range(0, ids.shape[0], batch_size), desc="calibrate (activation)", disable=not progress):
            x = ids[b:b + batch_size].to(device)
            body(input_ids=x, use_cache=False)  # the hooks see all they need; no vocabulary logits
            count[0] += x.numel()
            release_freed_memory()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return [(o / count[0], d / count[0]) for o, d in sums]


class Activation:
    """sum_j mean|x_j| * ||W[:, j]|| over each unit's input features j of o_proj and down_proj."""

    name = "activation"
    needs_calibration = True

    def __call__(self, model, layout, ids, ctx) -> list[dict]:
        means = activation_means(model, ids, batch_size=ctx.batch_size, progress=ctx.progress)
        out = []
        for layer, s, (o_mean, d_mean) in zip(decoder_layers(model), layout.layers, means):
            o_w, d_w = layer.self_attn.o_proj.weight.float(), layer.mlp.down_proj.weight.float()
            o_term = o_mean.float().to(o_w.device) * o_w.norm(dim=0)
            d_term = d_mean.float().to(d_w.device) * d_w.norm(dim=0)
            out.append({"kv": o_term.reshape(s.n_kv, -1).sum(1).cpu(), "mlp": d_term.cpu()})
        return out
