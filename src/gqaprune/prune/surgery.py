"""apply_plan(model, plan): slice projection weights to the kept units and fix the config.

The result is rebuilt as the class its shape calls for (see ``target_config``):
  * every layer the same, hidden_size divisible by the query heads -> stock ``LlamaConfig``;
  * every layer the same, not divisible (e.g. Llama-3-8B at 28 query heads: 4096 % 28 != 0;
    transformers 5's LlamaConfig refuses that even with head_dim set) -> stock ``MistralConfig``,
    whose model is Llama's math (RMSNorm, RoPE, SiLU MLP, no biases) and which transformers,
    vLLM and llama.cpp's converter all load with no extra code;
  * layers differ (per-layer layout, or uniform with protected layers) -> the family's per-layer
    class, e.g. ``GQAPrunedLlamaConfig`` (auto_map + remote code in the checkpoint).
Other families the same way with their own stock config (``_stock_config``).
Surgery never scores; scoring never touches weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gqaprune.errors import GQAPruneError

from gqaprune.models.family import family_of, projection, unit_index
from gqaprune.models.layout import decoder_layers, head_dim, model_layout, q_per_kv
from gqaprune.models.pruned_gqa import set_module
from gqaprune.prune.plan import PrunePlan

log = logging.getLogger(__name__)

# Config fields that describe the source file, not the architecture.
_DROP = ("quantization_config", "auto_map", "architectures", "_name_or_path", "model_type", "transformers_version",
         "kv_heads_per_layer", "intermediate_size_per_layer", "block_configs", "_commit_hash", "dtype", "torch_dtype")


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    dev = w.device
    if rows is not None:
        w = w.index_select(0, rows.to(dev))
    if cols is not None:
        w = w.index_select(1, cols.to(dev))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta")
    new.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.data if rows is None else lin.bias.data.index_select(0, rows.to(dev))
        new.bias = nn.Parameter(b.contiguous(), requires_grad=lin.bias.requires_grad)
    return new


def slice_in_place(model, plan: PrunePlan) -> None:
    """Replace each layer's projections with their kept rows/columns (no class or config change)."""
    layout = model_layout(model)
    plan.check_matches(layout)
    r, d = layout.q_per_kv, layout.head_dim
    fam = family_of(model)
    for layer, shape, groups, chans in zip(decoder_layers(model), layout.layers, plan.kv_groups, plan.mlp_channels):
        for p in fam.projections:   # every segment of a fused projection keeps its own rows
            idx = unit_index(p, chans if p.kind == "mlp" else groups, shape.n_kv, shape.n_mlp, r, d)
            lin = projection(layer, p)
            set_module(layer, p.path, _slice_linear(lin, **{"rows" if p.axis == "row" else "cols": idx}))
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = len(chans)
        if hasattr(layer.self_attn, "num_key_value_heads"):   # Phi-3 splits its fused qkv by this count
            layer.self_attn.num_key_value_heads = len(groups)


def target_config(config, kv: list[int], mlp: list[int], layout: str = "uniform"):
    """The config for a model whose layer i keeps ``kv[i]`` KV heads and ``mlp[i]`` channels.

    The same counts in every layer: the family's stock config (``_stock_config``). ``layout``
    ``per-layer-mlp`` with equal KV heads and varying MLP widths (Llama only): DeciLM's
    ``block_configs`` (models/pruned_deci.py), which vLLM serves. Every other shape: the family's
    per-layer class (models/pruned_gqa.py), written with its code.
    """
    from gqaprune.models.pruned_gqa import CLASSES

    fam = family_of(config)
    src = {k: v for k, v in config.to_dict().items() if k not in _DROP}
    r = q_per_kv(config)
    src["head_dim"] = head_dim(config)  # never let transformers derive it from hidden_size // heads
    if len(set(kv)) == 1 and len(set(mlp)) == 1:
        cfg = _stock_config(fam, config, src, kv[0], r, mlp[0])
        if cfg is not None:
            return cfg
    if layout == "per-layer-mlp" and len(set(kv)) == 1:
        check_layout_family(layout, fam)
        return _deci_config(src, kv[0], r, mlp)
    cls = CLASSES[fam.per_layer_type][0]
    if getattr(config, "model_type", None) == fam.per_layer_type:   # keep the unpruned model's base counts
        base_kv = config.num_key_value_heads
    else:
        base_kv = config.num_attention_heads // r
    src.update(num_attention_heads=base_kv * r, num_key_value_heads=base_kv, intermediate_size=config.intermediate_size)
    # not filtered to the class's fields: some families' configs (Qwen2) keep head_dim as a plain attribute
    return cls(**src, kv_heads_per_layer=list(kv), intermediate_size_per_layer=list(mlp))


def check_layout_family(layout: str, fam) -> None:
    """``per-layer-mlp`` is DeciLM's format, whose model is Llama's: refuse it for the other families."""
    if layout == "per-layer-mlp" and fam.name != "llama":
        raise GQAPruneError(f"--layout per-layer-mlp writes DeciLM block_configs, a Llama format, and this model is "
                            f"{fam.label}: use --layout per-layer or --layout uniform")


def _stock_config(fam, config, src: dict, n_kv: int, r: int, n_mlp: int):
    """The family's stock config with these counts, or None where its class cannot hold them.

    Llama-3-8B at 28 query heads (4096 % 28 != 0): transformers 5's LlamaConfig refuses a hidden size
    that is not a multiple of the head count even with head_dim set, so a Llama without biases is written
    as a stock ``MistralConfig`` (Llama's math: RMSNorm, RoPE, SiLU MLP, no biases; no sliding window),
    which transformers, vLLM and llama.cpp's converter load with no extra code. Gemma's configs refuse the
    same shapes and have no such twin: those are written as the per-layer class (remote code), with the
    same counts in every layer.
    """
    from transformers import MistralConfig

    from gqaprune.models.pruned_gqa import stock_classes

    src = dict(src, num_attention_heads=n_kv * r, num_key_value_heads=n_kv, intermediate_size=n_mlp)
    if not (fam.stock_divisible and config.hidden_size % (n_kv * r)):
        return stock_classes(fam.name)[0](**src)
    if fam.name == "llama" and not (src.get("attention_bias") or src.get("mlp_bias")):
        fields = set(MistralConfig.__dataclass_fields__)
        kw = {k: v for k, v in src.items() if k in fields}
        kw["sliding_window"] = None
        return MistralConfig(**kw)
    return None


def _deci_config(src: dict, n_kv: int, r: int, mlp: list[int]):
    from gqaprune.models.pruned_deci import GQAPrunedDeciConfig, block, width_to_ffn_mult

    src = {k: v for k, v in src.items() if k != "block_configs"}
    src.update(num_attention_heads=n_kv * r, num_key_value_heads=n_kv, intermediate_size=max(mlp))
    fields = set(GQAPrunedDeciConfig.__dataclass_fields__)
    kw = {k: v for k, v in src.items() if k in fields}
    try:
        blocks = [block(r, width_to_ffn_mult(w, src["hidden_size"])) for w in mlp]
    except ValueError as e:
        raise GQAPruneError(f"--layout per-layer-mlp: {e}; use --round-mlp-to 256 (or a multiple of it)") from e
    cfg = GQAPrunedDeciConfig(**kw, block_configs=blocks)
    cfg.architectures = ["DeciLMForCausalLM"]   # the name vLLM's registry serves (nemotron_nas.py)
    return cfg


def rebuild_as(model, config):
    """Move a sliced model's weights into a fresh instance of the class ``config`` calls for.

    Built on the meta device and filled by assignment, so no second copy of the weights
    and no random initialisation (which takes minutes for 8B on CPU).
    """
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"rebuild failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        new.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: move them over by name.
    old_buffers = dict(model.named_buffers())
    for name, _ in list(new.named_buffers()):
        if name in state:   # persistent: assigned by load_state_dict above
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = new.get_submodule(mod_name) if mod_name else new
        if name not in old_buffers:
            raise RuntimeError(f"rebuild failed: no source for buffer {name}")
        mod.register_buffer(attr, old_buffers[name], persistent=False)
    # Rotary classes keep the unscaled frequencies as a plain tensor attribute (``original_inv_freq``,
    # transformers 4.4x-5.x): pair the modules by name, so a structural difference cannot misalign them.
    old_modules = dict(model.named_modules())
    for name, m_new in new.named_modules():
        m_old = old_modules.get(name)
        val = getattr(m_old, "original_inv_freq", None) if m_old is not None else None
        if isinstance(val, torch.Tensor):
            m_new.original_inv_freq = val
    new.generation_config = model.generation_config
    new.config.use_cache = True
    return new.eval()


def apply_plan(model, plan: PrunePlan):
    """Slice ``model`` to ``plan`` (in place, freeing removed weights) and return the rebuilt model."""
    slice_in_place(model, plan)
    cfg = target_config(model.config, plan.kept_kv, plan.kept_mlp, plan.layout)
    log.info("rebuilding as %s", type(cfg).__name__)
    return rebuild_as(model, cfg)
