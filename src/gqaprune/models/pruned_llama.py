"""A Llama whose layers may differ in KV groups and MLP width (the ``per-layer`` layout).

transformers' Llama builds every layer from one ``num_key_value_heads`` and one
``intermediate_size``. This module adds a config with per-layer lists and a model
class that sizes each layer's projections from them; everything else (attention
kernels, RoPE, KV cache, generation) is stock Llama, because Llama's attention
derives the head count from the projection width (``view(..., -1, head_dim)``) and
the Q:KV ratio, which pruning preserves, is the same in every layer.

This file is self-contained (it imports only torch and transformers): gqaprune
copies it into every per-layer checkpoint and points ``auto_map`` at it, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works in a
process that never imports gqaprune.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel

MODEL_TYPE = "gqapruned_llama"


@strict
class GQAPrunedLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer KV-group and MLP-channel counts.

    ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` keep the
    unpruned model's values (they size nothing here); ``kv_heads_per_layer[i]`` and
    ``intermediate_size_per_layer[i]`` size layer ``i``. Query heads in layer ``i`` are
    ``kv_heads_per_layer[i] * num_attention_heads // num_key_value_heads`` (ratio kept).
    """

    model_type = MODEL_TYPE

    kv_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        if self.kv_heads_per_layer is None:
            self.kv_heads_per_layer = [self.num_key_value_heads] * n
        if self.intermediate_size_per_layer is None:
            self.intermediate_size_per_layer = [self.intermediate_size] * n

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate_architecture(self):
        """Per-layer lists must match the depth and be positive; the Q:KV ratio must be whole.

        Unlike LlamaConfig, hidden_size need not be a multiple of num_attention_heads:
        head_dim is explicit and every layer's width comes from the lists.
        """
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        for name in ("kv_heads_per_layer", "intermediate_size_per_layer"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(values)} entries for {self.num_hidden_layers} layers")
            if any(int(v) < 1 for v in values):
                raise ValueError(f"{name} must be >= 1 in every layer, got {values}")


def _resize_layers(model: LlamaModel, config: GQAPrunedLlamaConfig) -> None:
    """Replace each layer's projections with ones of that layer's width (fresh weights)."""
    r, d, h = config.q_per_kv, config.head_dim, config.hidden_size
    ab, mb = config.attention_bias, config.mlp_bias
    for layer, n_kv, inter in zip(model.layers, config.kv_heads_per_layer, config.intermediate_size_per_layer):
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = nn.Linear(h, n_kv * r * d, bias=ab)
        attn.k_proj = nn.Linear(h, n_kv * d, bias=ab)
        attn.v_proj = nn.Linear(h, n_kv * d, bias=ab)
        attn.o_proj = nn.Linear(n_kv * r * d, h, bias=ab)
        mlp.gate_proj = nn.Linear(h, inter, bias=mb)
        mlp.up_proj = nn.Linear(h, inter, bias=mb)
        mlp.down_proj = nn.Linear(inter, h, bias=mb)
        mlp.intermediate_size = inter


class GQAPrunedLlamaModel(LlamaModel):
    config_class = GQAPrunedLlamaConfig

    def __init__(self, config: GQAPrunedLlamaConfig):
        super().__init__(config)
        _resize_layers(self, config)
        self.post_init()


class GQAPrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = GQAPrunedLlamaConfig

    def __init__(self, config: GQAPrunedLlamaConfig):
        super().__init__(config)
        _resize_layers(self.model, config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, GQAPrunedLlamaConfig, exist_ok=True)
AutoModel.register(GQAPrunedLlamaConfig, GQAPrunedLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM, exist_ok=True)
