"""The analytical FLOPs model of ``gqaprune bench``: what speed would be if it followed FLOPs.

Analytical FLOPs per token (multiply-add = 2 FLOPs; norms, RoPE, softmax and the
activation function are ignored, they are O(hidden) per token):

    prefill = 2 * M_layers + 2 * M_head / P + 4 * A * (P + 1) / 2
    decode  = 2 * M_layers + 2 * M_head     + 4 * A * (P + (N + 1) / 2)

``M_layers``: weights of every ``nn.Linear`` in the decoder layers (q, k, v, o, gate, up,
down); ``M_head``: the LM head's weights (used once per prefill sequence, since only the
last position's logits are computed; once per token in decode); ``A`` = sum over layers
of (query heads x head_dim), the width of Q K^T and of attention x V; ``P`` = prompt_len,
``N`` = new_tokens. ``4 * A * ctx`` is Q K^T plus attention x V over ``ctx`` keys; with
causal masking a prompt token sees ``(P + 1) / 2`` keys on average and decode step ``i``
(1..N) sees ``P + i``. The embedding lookup is not a matmul and counts nothing.

``flops_ratio`` = model FLOPs / baseline FLOPs (below 1 for a pruned model); the ideal
speedup is ``1 / flops_ratio``; ``efficiency`` = measured speedup / ideal speedup
= measured speedup * flops_ratio (1.0 = speed scales exactly with FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import decoder_layers


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formula needs to know about a model."""

    params: int               # all parameters (tied embeddings counted once)
    layer_matmul_params: int  # weights of the decoder layers' nn.Linear modules
    head_matmul_params: int   # the LM head's weights
    attn_width: int           # sum over layers of query heads * head_dim
    n_layers: int

    def flops_per_token(self, phase: str, prompt_len: int, new_tokens: int) -> float:
        """Analytical FLOPs per processed token for ``phase`` = prefill | decode (module docstring)."""
        p, n = prompt_len, new_tokens
        if phase == "prefill":
            return 2 * self.layer_matmul_params + 2 * self.head_matmul_params / p + 4 * self.attn_width * (p + 1) / 2
        if phase == "decode":
            return 2 * self.layer_matmul_params + 2 * self.head_matmul_params + 4 * self.attn_width * (p + (n + 1) / 2)
        raise ValueError(f"phase must be prefill or decode, got {phase!r}")


def model_shape(model: torch.nn.Module) -> ModelShape:
    """Count the matmul weights and attention width of a Llama-style causal LM (plain or per-layer)."""
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise GQAPruneError(f"bench: {e}; gqaprune bench measures the model families gqaprune prunes") from e
    layer_mm = 0
    attn_width = 0
    for layer in layers:
        layer_mm += sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        # o_proj reads (query heads * head_dim) features, whatever the layer kept and whatever the family.
        attn_width += layer.self_attn.o_proj.in_features
    head = model.get_output_embeddings()
    head_mm = head.weight.numel() if head is not None else 0
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return ModelShape(params, layer_mm, head_mm, attn_width, len(layers))


def gguf_shape(path) -> ModelShape:
    """The same counts read from a GGUF file's tensors (llama.cpp engine): blk.* matrices, the output head
    (token_embd when the embeddings are tied), query heads x key_length per layer."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    heads = r.fields[f"{arch}.attention.head_count"].contents()
    n_layers = int(r.fields[f"{arch}.block_count"].contents())
    heads = list(heads) if isinstance(heads, list) else [heads] * n_layers
    d = int(r.fields[f"{arch}.attention.key_length"].contents())
    size = {t.name: int(t.n_elements) for t in r.tensors}
    layer_mm = sum(int(t.n_elements) for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    head_mm = size.get("output.weight", size.get("token_embd.weight", 0))
    params = sum(size.values())
    return ModelShape(params, layer_mm, head_mm, sum(int(h) * d for h in heads), n_layers)
