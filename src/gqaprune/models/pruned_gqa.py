"""GQA models whose layers may differ in KV groups and MLP width (the ``per-layer`` layout), for every
family gqaprune prunes: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma-2, Gemma-3 (text) and Phi-3.

transformers builds every layer of a family from one ``num_key_value_heads`` and one
``intermediate_size``. For each family this module adds a config with per-layer lists and model
classes that size each layer's projections from them; everything else (attention kernels, RoPE,
norms, soft-capping, KV cache, generation) is the family's own stock code, because its attention
derives the head count from the projection width (``view(..., -1, head_dim)``) and the Q:KV ratio,
which pruning preserves, is the same in every layer. Phi-3's attention reads the head counts from
its config instead, so each Phi-3 layer gets a copy of the config with that layer's counts.

``PROJECTIONS`` is the one description of where the units sit in a decoder layer of each family
(docs/architecture.md, "The unit of pruning"): every projection, the axis the units lie along
(``row`` = output features, ``col`` = input features) and the segments along that axis, in order:
``q`` = the query heads (``n_kv * r * head_dim``), ``kv`` = the KV heads (``n_kv * head_dim``),
``ch`` = the MLP channels. A fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) is several
segments. gqaprune's scoring and surgery read this table too (models/family.py).

This file is self-contained (it imports only torch and transformers): gqaprune copies it into
every per-layer checkpoint and points ``auto_map`` at it, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works in a process that
never imports gqaprune.
"""

from __future__ import annotations

import copy
import importlib

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

_SPLIT = (("self_attn.q_proj", "row", ("q",)), ("self_attn.k_proj", "row", ("kv",)),
          ("self_attn.v_proj", "row", ("kv",)), ("self_attn.o_proj", "col", ("q",)),
          ("mlp.gate_proj", "row", ("ch",)), ("mlp.up_proj", "row", ("ch",)), ("mlp.down_proj", "col", ("ch",)))
_FUSED = (("self_attn.qkv_proj", "row", ("q", "kv", "kv")), ("self_attn.o_proj", "col", ("q",)),
          ("mlp.gate_up_proj", "row", ("ch", "ch")), ("mlp.down_proj", "col", ("ch",)))

# family (the stock model_type) -> (transformers module, config, base model, causal LM, class-name stem, projections)
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaModel", "LlamaForCausalLM", "Llama", _SPLIT),
    "mistral": ("mistral", "MistralConfig", "MistralModel", "MistralForCausalLM", "Mistral", _SPLIT),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM", "Qwen2", _SPLIT),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3Model", "Qwen3ForCausalLM", "Qwen3", _SPLIT),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2Model", "Gemma2ForCausalLM", "Gemma2", _SPLIT),
    "gemma3_text": ("gemma3", "Gemma3TextConfig", "Gemma3TextModel", "Gemma3ForCausalLM", "Gemma3Text", _SPLIT),
    "phi3": ("phi3", "Phi3Config", "Phi3Model", "Phi3ForCausalLM", "Phi3", _FUSED),
}
PROJECTIONS = {fam: spec[5] for fam, spec in FAMILIES.items()}


def per_layer_type(family: str) -> str:
    """The per-layer model_type of a family (``llama`` -> ``gqapruned_llama``)."""
    return f"gqapruned_{family}"


def segment_width(seg: str, n_kv: int, r: int, d: int, n_mlp: int) -> int:
    """Features of one segment: query heads (n_kv*r*d), KV heads (n_kv*d) or MLP channels."""
    return {"q": n_kv * r * d, "kv": n_kv * d, "ch": n_mlp}[seg]


def get_module(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, new)


def resize_layers(model: nn.Module, config, family: str) -> None:
    """Give each decoder layer projections of that layer's width (fresh weights, bias as the stock layer has)."""
    r = config.num_attention_heads // config.num_key_value_heads
    d, h = config.head_dim, config.hidden_size
    for layer, n_kv, n_mlp in zip(model.layers, config.kv_heads_per_layer, config.intermediate_size_per_layer):
        for path, axis, segs in PROJECTIONS[family]:
            old = get_module(layer, path)
            width = sum(segment_width(s, n_kv, r, d, n_mlp) for s in segs)
            shape = (h, width) if axis == "row" else (width, h)
            set_module(layer, path, nn.Linear(*shape, bias=old.bias is not None))
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = n_mlp
        attn = layer.self_attn
        if hasattr(attn, "num_key_value_heads"):   # Phi-3 splits qkv by these counts
            attn.num_key_value_heads = n_kv
        if getattr(attn, "config", None) is config and family == "phi3":
            own = copy.copy(config)
            own.num_attention_heads, own.num_key_value_heads = n_kv * r, n_kv
            attn.config = own


def _check_lists(config) -> None:
    """Per-layer lists must match the depth and be positive; the Q:KV ratio must be whole."""
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    for name in ("kv_heads_per_layer", "intermediate_size_per_layer"):
        values = getattr(config, name)
        if values is None:
            continue
        if len(values) != config.num_hidden_layers:
            raise ValueError(f"{name} has {len(values)} entries for {config.num_hidden_layers} layers")
        if any(int(v) < 1 for v in values):
            raise ValueError(f"{name} must be >= 1 in every layer, got {values}")


def stock_classes(family: str):
    """The family's stock (config, base model, causal LM) classes from transformers."""
    mod_name, cfg_name, model_name, lm_name, _, _ = FAMILIES[family]
    mod = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
    cfg_mod = importlib.import_module(f"transformers.models.{mod_name}.configuration_{mod_name}")
    return getattr(cfg_mod, cfg_name), getattr(mod, model_name), getattr(mod, lm_name)


def _make_classes(family: str):
    """(config, base model, causal LM) per-layer classes of ``family``, built on its stock classes."""
    base_cfg, base_model, base_lm = stock_classes(family)
    stem = FAMILIES[family][4]
    model_type = per_layer_type(family)

    @strict
    class Config(base_cfg):
        """The family's config plus per-layer KV-group and MLP-channel counts.

        ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` keep the unpruned
        model's values (they size nothing here); ``kv_heads_per_layer[i]`` and
        ``intermediate_size_per_layer[i]`` size layer ``i``, whose query heads are
        ``kv_heads_per_layer[i] * num_attention_heads // num_key_value_heads`` (ratio kept).
        """

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
            """Unlike the stock check, hidden_size need not be a multiple of num_attention_heads: head_dim is
            explicit and every layer's width comes from the lists."""
            _check_lists(self)

    Config.model_type = model_type

    class Model(base_model):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            resize_layers(self, config, family)
            self.post_init()

    class ForCausalLM(base_lm):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            resize_layers(self.model, config, family)
            self.post_init()

    out = []
    for cls, suffix in ((Config, "Config"), (Model, "Model"), (ForCausalLM, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = f"GQAPruned{stem}{suffix}"
        cls.__module__ = __name__
        out.append(cls)
    return tuple(out)


CLASSES = {}   # per-layer model_type -> (config, model, causal LM)
for _family in FAMILIES:
    _classes = _make_classes(_family)
    CLASSES[per_layer_type(_family)] = _classes
    globals().update({c.__name__: c for c in _classes})   # auto_map names them: gqapruned.GQAPrunedQwen2Config
    AutoConfig.register(per_layer_type(_family), _classes[0], exist_ok=True)
    AutoModel.register(_classes[0], _classes[1], exist_ok=True)
    AutoModelForCausalLM.register(_classes[0], _classes[2], exist_ok=True)
