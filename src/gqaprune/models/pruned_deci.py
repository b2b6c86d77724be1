"""A Llama whose layers share one attention shape but differ in MLP width, in DeciLM's ``block_configs``
format (``model_type: nemotron-nas``): the ``per-layer-mlp`` layout, which vLLM's stock
``DeciLMForCausalLM`` (``nemotron_nas.py``) serves.

vLLM's per-layer model keeps the number of query heads global and varies only the KV heads
(``n_heads_in_group``) and the MLP; gqaprune's KV-group pruning removes query heads with their
KV head, so only this layout, where every layer keeps the same KV groups, maps onto it. Each
block is written as DeciLM writes it:

    {"attention": {"n_heads_in_group": q_heads // kv_heads, "no_op": false, "replace_with_linear": false, ...},
     "ffn": {"ffn_mult": m, "no_op": false, "replace_with_linear": false}}

with the MLP width ``find_multiple(int(2 * m * hidden / 3), 256)`` (DeciLM's rule, the same in
vLLM, llama.cpp and NVIDIA's code), so widths are multiples of 256 and ``m`` is chosen to
land exactly on them. This file sizes every layer by that same rule, so what transformers
loads here is what vLLM builds.

Self-contained (torch and transformers only): gqaprune copies it into the checkpoint and points
``auto_map`` at it, so ``trust_remote_code=True`` loads it where gqaprune is absent (vLLM reads
only the config class from it).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel

MODEL_TYPE = "nemotron-nas"
FFN_MULTIPLE = 256


def ffn_mult_to_width(ffn_mult: float, hidden: int) -> int:
    """DeciLM's MLP width for ``ffn_mult``: int(2 * m * hidden / 3) rounded up to a multiple of 256."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


def width_to_ffn_mult(width: int, hidden: int) -> float:
    """The ``ffn_mult`` that gives ``width`` (a multiple of 256): aimed at the middle of its interval, so the
    6-decimal rounding DeciLM applies cannot move it to a neighbour."""
    if width % FFN_MULTIPLE:
        raise ValueError(f"MLP width {width} is not a multiple of {FFN_MULTIPLE}; DeciLM cannot express it")
    m = round(3 * (width - FFN_MULTIPLE / 2) / (2 * hidden), 6)
    assert ffn_mult_to_width(m, hidden) == width
    return m


class _Block(dict):
    """A block config that reads like DeciLM's dataclasses (``block.ffn.ffn_mult``) and saves as plain JSON."""

    def __getattr__(self, name):
        try:
            v = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return _Block(v) if isinstance(v, dict) and not isinstance(v, _Block) else v


def block(n_heads_in_group: int, ffn_mult: float) -> dict:
    return {"attention": {"n_heads_in_group": n_heads_in_group, "no_op": False, "replace_with_linear": False,
                          "sparsify": None, "num_sink_tokens": None, "use_prefill_window_in_sink_attention": False,
                          "unshifted_sink": False, "window_length": None},
            "ffn": {"ffn_mult": ffn_mult, "no_op": False, "replace_with_linear": False, "sparsify": None}}


@strict
class GQAPrunedDeciConfig(LlamaConfig):
    """LlamaConfig plus DeciLM ``block_configs``: the same attention in every layer, MLP width per layer.

    ``num_attention_heads`` / ``num_key_value_heads`` are the (pruned) counts every layer has;
    ``intermediate_size`` keeps the widest layer's width (it sizes nothing here).
    """

    model_type = MODEL_TYPE

    block_configs: list[dict] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.block_configs is None:
            g = self.num_attention_heads // self.num_key_value_heads
            self.block_configs = [block(g, width_to_ffn_mult(self.intermediate_size, self.hidden_size))] * \
                self.num_hidden_layers
        self.block_configs = [_Block(b) for b in self.block_configs]

    def mlp_widths(self) -> list[int]:
        return [ffn_mult_to_width(b.ffn.ffn_mult, self.hidden_size) for b in self.block_configs]

    def validate_architecture(self):
        """Blocks must match the depth, keep attention and MLP (no no_op / linear replacements), and share
        one attention shape."""
        if self.block_configs is None:
            return
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(self.block_configs)} entries for {self.num_hidden_layers} "
                             "layers")
        for i, b in enumerate(self.block_configs):
            a, f = b["attention"], b["ffn"]
            if a.get("no_op") or a.get("replace_with_linear") or f.get("no_op") or f.get("replace_with_linear"):
                raise ValueError(f"block {i}: no_op / replace_with_linear blocks are not supported here")
            if a["n_heads_in_group"] != self.num_attention_heads // self.num_key_value_heads:
                raise ValueError(f"block {i}: n_heads_in_group {a['n_heads_in_group']} differs from the model's "
                                 f"{self.num_attention_heads // self.num_key_value_heads}")


def _size_mlps(model: LlamaModel, config: GQAPrunedDeciConfig) -> None:
    h, mb = config.hidden_size, config.mlp_bias
    for layer, inter in zip(model.layers, config.mlp_widths()):
        mlp = layer.mlp
        mlp.gate_proj = nn.Linear(h, inter, bias=mb)
        mlp.up_proj = nn.Linear(h, inter, bias=mb)
        mlp.down_proj = nn.Linear(inter, h, bias=mb)
        mlp.intermediate_size = inter


class GQAPrunedDeciModel(LlamaModel):
    config_class = GQAPrunedDeciConfig

    def __init__(self, config: GQAPrunedDeciConfig):
        super().__init__(config)
        _size_mlps(self, config)
        self.post_init()


class GQAPrunedDeciForCausalLM(LlamaForCausalLM):
    config_class = GQAPrunedDeciConfig

    def __init__(self, config: GQAPrunedDeciConfig):
        super().__init__(config)
        _size_mlps(self.model, config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, GQAPrunedDeciConfig, exist_ok=True)
AutoModel.register(GQAPrunedDeciConfig, GQAPrunedDeciModel, exist_ok=True)
AutoModelForCausalLM.register(GQAPrunedDeciConfig, GQAPrunedDeciForCausalLM, exist_ok=True)
