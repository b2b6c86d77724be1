"""The one layer-by-layer runner: capture what enters the decoder layers, run sublayers on their own,
remove units by zeroing their inputs, and compare next-token distributions.

Everything that needs per-layer activations goes through here: the ``obs`` criterion,
compensation, the sensitivity probes, the split search and the allocation search.

* ``capture_layer_inputs``: per calibration batch, the hidden states entering decoder
  layer 0 and the keyword arguments (rotary embeddings, causal mask, positions) the model
  passes every layer, so layers can be run one at a time.
* ``attention`` / ``mlp``: a Llama-style pre-norm sublayer's output together with the input
  of its consuming projection (o_proj / down_proj), which is what a refit or an OBS score
  reads.
* ``zero_units``: forward pre-hooks that zero the o_proj / down_proj input features of
  some units; that is exactly equivalent to slicing the units away (tests), and leaves the
  weights untouched.
* ``Head``: the final norm and LM head, for log-probabilities from the last hidden states.
"""

from __future__ import annotations

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import decoder_layers, q_rows


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


@torch.no_grad()
def capture_layer_inputs(model, ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Per batch: (hidden states entering decoder layer 0, the keyword arguments the layers get)."""
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


def check_layers(model, what: str) -> list:
    """The decoder layers, refused with a message when they are not Llama-style (pre-norm attention, then MLP)."""
    layers = decoder_layers(model)
    need = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    for i, layer in enumerate(layers):
        missing = [n for n in need if not hasattr(layer, n)]
        if missing:
            raise GQAPruneError(f"{what}: decoder layer {i} has no {', '.join(missing)}; it supports Llama-style "
                                "layers (pre-norm attention, then pre-norm MLP)")
    return layers


class _Capture:
    """A forward pre-hook that keeps the input of one nn.Linear."""

    def __init__(self, lin):
        self.x = None
        self.h = lin.register_forward_pre_hook(self)

    def __call__(self, mod, args):
        self.x = args[0].detach()

    def remove(self):
        self.h.remove()


def attention(layer, h: torch.Tensor, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj input, attention output) of ``layer`` on hidden states ``h``; the residual is h + output."""
    cap = _Capture(layer.self_attn.o_proj)
    try:
        out = layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]
    finally:
        cap.remove()
    return cap.x, out


def mlp(layer, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down_proj input, MLP output) of ``layer`` on the post-attention residual ``r``."""
    cap = _Capture(layer.mlp.down_proj)
    try:
        out = layer.mlp(layer.post_attention_layernorm(r))
    finally:
        cap.remove()
    return cap.x, out


class ZeroInputs:
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


def zero_units(layer, kv_rm, ch_rm, r: int, d: int) -> list[ZeroInputs]:
    """Hooks that remove KV groups ``kv_rm`` and MLP channels ``ch_rm`` from ``layer`` (weights untouched)."""
    hooks = []
    if len(kv_rm):
        hooks.append(ZeroInputs(layer.self_attn.o_proj, q_rows(sorted(kv_rm), r, d)))
    if len(ch_rm):
        hooks.append(ZeroInputs(layer.mlp.down_proj, torch.as_tensor(ch_rm, dtype=torch.long)))
    return hooks


def remove_hooks(hooks) -> None:
    for hk in hooks:
        hk.remove()


class Head:
    """The final norm and the LM head: next-token log-probabilities from the last layer's hidden states."""

    def __init__(self, model, what: str):
        base = getattr(model, "model", model)
        self.norm = getattr(base, "norm", None)
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self.norm is None or self.head is None:
            raise GQAPruneError(f"{what}: the model has no final norm / output head where a Llama-style causal LM "
                                "has them (model.model.norm, lm_head)")

    def logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (float32) at every position but the last."""
        return torch.log_softmax(self.head(self.norm(h))[:, :-1].float(), dim=-1)


def nll(logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of ``ids`` under ``logp``."""
    tgt = ids[:, 1:].to(logp.device)
    return -float(logp.gather(-1, tgt[..., None]).sum())


def kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Summed KL(ref || this) over positions."""
    return float((logp_ref.exp() * (logp_ref - logp)).sum())


def tokens_scored(batches) -> int:
    """Next-token predictions in a list of (batch, seq) tensors: each row scores seq - 1 tokens."""
    return sum(x.shape[0] * (x.shape[1] - 1) for x in batches)
