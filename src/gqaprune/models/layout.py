"""Where the prunable units are: KV groups and MLP channels (docs/architecture.md, "The unit of pruning").

This module is the one home of the model's shape: ``head_dim``, the decoder layers, the
per-layer unit counts and the row/column indices of a unit. Everything else asks here.

In a layer with ``n_q`` query heads, ``n_kv`` KV heads and ``r = n_q / n_kv``, KV group ``g`` is
rows ``g*d:(g+1)*d`` of k_proj and v_proj, rows ``g*r*d:(g+1)*r*d`` of q_proj and the same
input columns of o_proj (``d = head_dim``). MLP channel ``c`` is row ``c`` of gate_proj and
up_proj and column ``c`` of down_proj. Sizes are read from the modules, so a model that
was pruned before (with different widths per layer) is described correctly too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerShape:
    n_kv: int          # KV groups in this layer
    n_mlp: int         # MLP channels in this layer


@dataclass(frozen=True)
class ModelLayout:
    """Everything pruning needs to know about a model's shape."""

    num_layers: int
    hidden_size: int
    head_dim: int
    q_per_kv: int                      # r: query heads per KV head (kept by pruning)
    layers: tuple[LayerShape, ...]
    attention_bias: bool
    mlp_bias: bool
    total_params: int                  # tied embeddings counted once

    @property
    def group_params(self) -> int:
        """Parameters in one KV group: q and o (r*d*h each), k and v (d*h each), plus biases."""
        h, d, r = self.hidden_size, self.head_dim, self.q_per_kv
        n = (2 * r + 2) * d * h
        if self.attention_bias:
            n += (r + 2) * d  # q, k, v biases; o_proj's bias is per hidden unit, not per group
        return n

    @property
    def channel_params(self) -> int:
        """Parameters in one MLP channel: a row of gate and up, a column of down (+ biases)."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def params_with(self, kv: list[int], mlp: list[int]) -> int:
        """Total parameters if layer i keeps ``kv[i]`` groups and ``mlp[i]`` channels."""
        removed = sum((s.n_kv - k) * self.group_params + (s.n_mlp - m) * self.channel_params
                      for s, k, m in zip(self.layers, kv, mlp))
        return self.total_params - removed


def head_dim(config) -> int:
    """Width of one attention head: the config's explicit ``head_dim``, else hidden / query heads.

    ``config`` is a transformers config or its ``config.json`` dict. Pruning never changes
    head_dim, and always writes it explicitly, because transformers falls back to
    ``hidden_size // num_attention_heads``, which is wrong once query heads are removed.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    d = get("head_dim")
    return int(d) if d else int(get("hidden_size")) // int(get("num_attention_heads"))


def q_per_kv(config) -> int:
    """Query heads per KV head (the ratio pruning keeps); plain multi-head attention gives 1."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    n_q = int(get("num_attention_heads"))
    return n_q // int(get("num_key_value_heads") or n_q)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a Llama-like causal LM (``model.model.layers``), also under a PEFT wrapper."""
    base = getattr(model, "model", model)
    base = getattr(base, "base_model", base) if not hasattr(base, "layers") else base
    if hasattr(base, "model") and not hasattr(base, "layers"):
        base = base.model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers where a Llama-style causal LM has them "
                         "(model.model.layers)")
    return list(layers)


def count_params(model) -> int:
    """Parameters, each tensor once (tied input/output embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


def model_layout(model) -> ModelLayout:
    cfg = model.config
    d, r = head_dim(cfg), q_per_kv(cfg)
    shapes = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        n_kv = attn.k_proj.out_features // d
        if attn.q_proj.out_features != n_kv * r * d or attn.v_proj.out_features != n_kv * d \
                or attn.o_proj.in_features != n_kv * r * d:
            raise ValueError(
                f"layer {len(shapes)}: projection widths q={attn.q_proj.out_features} k={attn.k_proj.out_features} "
                f"v={attn.v_proj.out_features} o_in={attn.o_proj.in_features} break Q:KV = {r} with head_dim {d}"
            )
        shapes.append(LayerShape(n_kv=n_kv, n_mlp=mlp.gate_proj.out_features))
    return ModelLayout(
        num_layers=len(shapes), hidden_size=cfg.hidden_size, head_dim=d, q_per_kv=r, layers=tuple(shapes),
        attention_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        total_params=count_params(model),
    )


def q_rows(groups, r: int, d: int) -> torch.Tensor:
    """Row indices of q_proj (= input columns of o_proj) for the given KV groups."""
    return torch.cat([torch.arange(g * r * d, (g + 1) * r * d) for g in groups]) if len(groups) else torch.empty(0, dtype=torch.long)


def kv_rows(groups, d: int) -> torch.Tensor:
    """Row indices of k_proj / v_proj for the given KV groups."""
    return torch.cat([torch.arange(g * d, (g + 1) * d) for g in groups]) if len(groups) else torch.empty(0, dtype=torch.long)
