"""The one layer-by-layer runner: capture what enters the decoder layers, run sublayers on their own,
remove units by zeroing their inputs, and compare next-token distributions.

Everything that needs per-layer activations goes through here: the ``obs`` criterion,
compensation, the sensitivity probes, the split search and the allocation search.

* ``capture_layer_inputs``: per calibration batch, the hidden states entering decoder
  layer 0 and the keyword arguments (rotary embeddings, causal mask, positions) the model
  passes each layer, so layers can be run one at a time. Families whose layers differ in
  type (Gemma's sliding-window and global layers get different masks and rotary tables)
  have them captured layer by layer; the others reuse layer 0's.
* ``Sublayers``: a pre-norm sublayer's consuming projection (o_proj / down_proj) with its
  input and output, which is what a refit or an OBS score reads, and the residual update
  that output makes, through the family's norms (Gemma's "sandwich" norms normalise o_proj's
  and down_proj's outputs before the residual add; Llama-style layers add them as they are).
* ``zero_units``: forward pre-hooks that zero the o_proj / down_proj input features of
  some units; that is exactly equivalent to slicing the units away (tests), and leaves the
  weights untouched.
* ``Head``: the final norm and LM head, for log-probabilities from the last hidden states;
  ``DenseTarget``: the dense model's distributions on fixed samples, for KL(dense || pruned)
  from a candidate's last hidden states at the cost of the head's matmul.
"""

from __future__ import annotations

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.family import family_of
from gqaprune.models.layout import decoder_layers, q_rows


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


@torch.no_grad()
def capture_layer_inputs(model, ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per batch: (hidden states entering decoder layer 0, the keyword arguments of each layer, by index)."""
    layers = decoder_layers(model)
    types = getattr(model.config, "layer_types", None)
    each = types is not None and len(set(types)) > 1   # masks / rotary tables differ by layer type
    device = next(model.parameters()).device
    store: list[tuple[torch.Tensor, list[dict]]] = []

    def hook_for(i):
        def hook(mod, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                store.append(((args[0] if args else kwargs["hidden_states"]).detach(), []))
            store[-1][1].append(kw)
            if not each:
                store[-1][1].extend([kw] * (len(layers) - 1))
            if not each or i == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i, layer in enumerate(layers if each else layers[:1])]
    was = model.training
    model.eval()
    try:
        for b in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[b:b + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
        model.train(was)
    return store


def run_layers(layers, h: torch.Tensor, kws: list[dict], start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Hidden states after decoder layers ``start:stop`` of ``h`` (entering layer ``start``)."""
    for i in range(start, len(layers) if stop is None else stop):
        h = layers[i](h, **kws[i])
    return h


def check_layers(model, what: str) -> list:
    """The decoder layers, refused with a message when they lack the modules the family's layers have."""
    fam = family_of(model)
    layers = decoder_layers(model)
    need = [fam.attn_norm, "self_attn", fam.mlp_norm, "mlp"] + [n for n in (fam.attn_out_norm, fam.mlp_out_norm) if n]
    for i, layer in enumerate(layers):
        missing = [n for n in need if not hasattr(layer, n)]
        if missing:
            raise GQAPruneError(f"{what}: decoder layer {i} has no {', '.join(missing)}, which {fam.label} layers have")
    return layers


class _Capture:
    """A forward hook that keeps the input and the output of one nn.Linear."""

    def __init__(self, lin):
        self.x = self.y = None
        self.h = lin.register_forward_hook(self)

    def __call__(self, mod, args, out):
        self.x, self.y = args[0].detach(), out.detach()

    def remove(self):
        self.h.remove()


class Sublayers:
    """The sublayers of one model's decoder layers, run on their own through the family's norms."""

    def __init__(self, model, what: str):
        self.fam = family_of(model)
        self.layers = check_layers(model, what)

    def _norm(self, layer, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return getattr(layer, name)(x) if name else x

    def attention(self, layer, h: torch.Tensor, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(o_proj input, o_proj output) of ``layer`` on hidden states ``h``."""
        cap = _Capture(layer.self_attn.o_proj)
        try:
            layer.self_attn(hidden_states=self._norm(layer, self.fam.attn_norm, h), **kw)
        finally:
            cap.remove()
        return cap.x, cap.y

    def mlp(self, layer, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down_proj input, down_proj output) of ``layer`` on the post-attention residual ``r``."""
        cap = _Capture(layer.mlp.down_proj)
        try:
            layer.mlp(self._norm(layer, self.fam.mlp_norm, r))
        finally:
            cap.remove()
        return cap.x, cap.y

    def add_attention(self, layer, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The residual after attention, from its o_proj output ``y``."""
        return h + self._norm(layer, self.fam.attn_out_norm, y)

    def add_mlp(self, layer, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The residual after the MLP, from its down_proj output ``y``."""
        return r + self._norm(layer, self.fam.mlp_out_norm, y)


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
            raise GQAPruneError(f"{what}: the model has no final norm / output head where a causal LM of these "
                                "families has them (model.model.norm, lm_head)")
        self.softcap = getattr(model.config, "final_logit_softcapping", None)   # Gemma: cap * tanh(logits / cap)

    def logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (float32) at every position but the last."""
        logits = self.head(self.norm(h))[:, :-1].float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)


class DenseTarget:
    """The unpruned model's next-token distributions on fixed samples, kept so that KL(dense || pruned)
    (and the pruned model's NLL) come from the pruned model's last hidden states without materialising
    its log-probabilities: the searches call this once per candidate, and on a 2-core CPU the log-softmax
    and the elementwise KL over the vocabulary took about as long as the LM head's matmul itself.

    Per position, with z = W n(h) + b the candidate's logits and p the dense distribution:
    KL = sum_v p_v log p_v - sum_v p_v z_v + logsumexp(z), and sum_v p_v z_v = n(h) . (W^T p) + p . b.
    ``W^T p`` (positions x hidden) and ``sum p log p`` are computed once here, so a candidate costs the
    matmul and one logsumexp; the per-position terms are summed in float64 (the KL is a small
    difference of terms about 10-30 in size). With a logit softcap (Gemma-2) z is not linear in n(h),
    and the dense log-probabilities are kept instead (the plain formula, ``kl``).

    ``h_ref``: the dense model's last hidden states of one batch, (batch, seq, hidden).
    """

    def __init__(self, head: Head, h_ref: torch.Tensor):
        self.head = head
        self.linear = head.softcap is None and isinstance(head.head, torch.nn.Linear)
        logp = head.logprobs(h_ref)                                   # (batch, seq-1, vocab) float32
        if not self.linear:
            self.logp = logp
            return
        p = logp.exp()
        self.neg_entropy = (p * logp).sum(-1).double()                # (batch, seq-1)
        w = head.head.weight                                          # (vocab, hidden)
        self.u = (p.to(w.dtype) @ w).float()                          # (batch, seq-1, hidden) = W^T p
        b = head.head.bias
        self.pb = (p @ b.float()).double() if b is not None else 0.0  # (batch, seq-1)

    def kl(self, h: torch.Tensor) -> float:
        """Summed KL(dense || this) over the batch's positions; ``h``: the pruned model's last hidden states."""
        return self.nll_kl(h)[1]

    def nll_kl(self, h: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[float | None, float]:
        """(summed next-token NLL of ``ids``, or None without them; summed KL(dense || this)), from one set of logits."""
        if not self.linear:
            logp = self.head.logprobs(h)
            return (nll(logp, ids) if ids is not None else None), kl(self.logp, logp)
        n = self.head.norm(h)[:, :-1]
        z = self.head.head(n).float()                                 # (batch, seq-1, vocab)
        lse = torch.logsumexp(z, -1).double()
        cross = (n.float() * self.u).sum(-1).double() + self.pb
        kl_sum = float((self.neg_entropy - cross + lse).sum())
        if ids is None:
            return None, kl_sum
        tgt = ids[:, 1:].to(z.device)
        return float((lse - z.gather(-1, tgt[..., None])[..., 0].double()).sum()), kl_sum


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
