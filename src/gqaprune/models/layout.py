"""Where the prunable units are: KV groups and MLP channels (docs/architecture.md, "The unit of pruning").

This module is the one home of the model's shape: ``head_dim``, the decoder layers, the
per-layer unit counts and the row/column indices of a unit. Everything else asks here.

In a layer with ``n_q`` query heads, ``n_kv`` KV heads and ``r = n_q / n_kv``, KV group ``g`` is
rows ``g*d:(g+1)*d`` of k_proj and v_proj, rows ``g*r*d:(g+1)*r*d`` of q_proj and the same
input columns of o_proj (``d = head_dim``). MLP channel ``c`` is row ``c`` of gate_proj and
up_proj and column ``c`` of down_proj. Where those rows sit in each family (fused projections,
biases) is models/family.py's business. Sizes are read from the modules, so a model that
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
    group_params: int                  # parameters in one KV group: q and o (r*d*h each), k and v (d*h), biases
    channel_params: int                # parameters in one MLP channel: a row of gate and up, a column of down
    total_params: int                  # tied embeddings counted once
    family: str = "llama"              # models/family.py

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
    """The model's units per layer, read from its modules through its family's description."""
    from gqaprune.models.family import family_of, projection, segment_widths

    cfg = model.config
    fam = family_of(cfg)
    d, r = head_dim(cfg), q_per_kv(cfg)
    shapes, per_unit = [], None
    for i, layer in enumerate(decoder_layers(model)):
        n_kv = layer.self_attn.o_proj.in_features // (r * d)
        n_mlp = layer.mlp.down_proj.in_features
        unit_params = {"kv": 0, "mlp": 0}
        for p in fam.projections:
            lin = projection(layer, p)
            have = lin.out_features if p.axis == "row" else lin.in_features
            want = sum(segment_widths(p, n_kv, n_mlp, r, d))
            if have != want:
                raise ValueError(f"layer {i}: {p.path} is {have} wide where {n_kv} KV groups with Q:KV = {r}, "
                                 f"head_dim {d} and {n_mlp} MLP channels need {want}")
            n = n_mlp if p.kind == "mlp" else n_kv
            other = lin.in_features if p.axis == "row" else lin.out_features
            unit_params[p.kind] += have // n * other + (have // n if p.axis == "row" and lin.bias is not None else 0)
        per_unit = per_unit or unit_params
        shapes.append(LayerShape(n_kv=n_kv, n_mlp=n_mlp))
    return ModelLayout(
        num_layers=len(shapes), hidden_size=cfg.hidden_size, head_dim=d, q_per_kv=r, layers=tuple(shapes),
        group_params=per_unit["kv"], channel_params=per_unit["mlp"], total_params=count_params(model),
        family=fam.name,
    )


def q_rows(groups, r: int, d: int) -> torch.Tensor:
    """Input columns of o_proj (= rows of a separate q_proj) for the given KV groups."""
    return torch.cat([torch.arange(g * r * d, (g + 1) * r * d) for g in groups]) if len(groups) else torch.empty(0, dtype=torch.long)
