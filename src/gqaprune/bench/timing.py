"""One timed prefill + greedy decode (the nanoGPT recipe: warm up, synchronise, then time)."""

from __future__ import annotations

import time

import torch

from gqaprune.compat.transformers import cache_kwarg, new_cache


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.inference_mode()
def run_once(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """One prefill + greedy decode; returns (prefill seconds, decode seconds, new token ids [batch, new_tokens + 1])."""
    dev = input_ids.device
    cache = new_cache(model)
    kw = cache_kwarg(model)
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    t1 = time.perf_counter()
    toks = [nxt]
    for _ in range(new_tokens):
        # The DynamicCache is updated in place; positions follow from its length.
        out = model(input_ids=nxt, use_cache=True, **{kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    _sync(dev)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, dim=1)
