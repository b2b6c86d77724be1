"""apply_plan(model, plan): slice projection weights to the kept units and fix the config.

The result is rebuilt as the class its shape calls for (see ``target_config``):
  * every layer the same, hidden_size divisible by the query heads -> stock ``LlamaConfig``;
  * every layer the same, not divisible (e.g. Llama-3-8B at 28 query heads: 4096 % 28 != 0;
    transformers 5's LlamaConfig refuses that even with head_dim set) -> stock ``MistralConfig``,
    whose model is Llama's math (RMSNorm, RoPE, SiLU MLP, no biases) and which transformers,
    vLLM and llama.cpp's converter all load with no extra code;
  * layers differ (per-layer layout, or uniform with protected layers) -> gqaprune's
    ``GQAPrunedLlamaConfig`` (auto_map + remote code in the checkpoint).
Surgery never scores; scoring never touches weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gqaprune.errors import GQAPruneError

from gqaprune.models.layout import decoder_layers, head_dim, kv_rows, model_layout, q_per_kv, q_rows
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
    for layer, groups, chans in zip(decoder_layers(model), plan.kv_groups, plan.mlp_channels):
        attn, mlp = layer.self_attn, layer.mlp
        qi, kvi = q_rows(groups, r, d), kv_rows(groups, d)
        ci = torch.tensor(chans, dtype=torch.long)
        attn.q_proj = _slice_linear(attn.q_proj, rows=qi)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kvi)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kvi)
        attn.o_proj = _slice_linear(attn.o_proj, cols=qi)
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=ci)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=ci)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=ci)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(chans)


def target_config(config, kv: list[int], mlp: list[int], layout: str = "uniform"):
    """The config for a model whose layer i keeps ``kv[i]`` KV heads and ``mlp[i]`` channels.

    ``layout`` ``per-layer-mlp`` with equal KV heads and varying MLP widths: DeciLM's ``block_configs``
    (models/pruned_deci.py), which vLLM serves; every other varying shape: gqaprune's per-layer Llama.
    """
    from transformers import LlamaConfig, MistralConfig

    from gqaprune.models.pruned_llama import GQAPrunedLlamaConfig

    src = {k: v for k, v in config.to_dict().items() if k not in _DROP}
    r = q_per_kv(config)
    n_kv_src = config.num_attention_heads // r
    src["head_dim"] = head_dim(config)  # never let transformers derive it from hidden_size // heads
    biased = bool(src.get("attention_bias")) or bool(src.get("mlp_bias"))
    if len(set(kv)) == 1 and len(set(mlp)) == 1 and not (biased and config.hidden_size % (kv[0] * r)):
        src.update(num_attention_heads=kv[0] * r, num_key_value_heads=kv[0], intermediate_size=mlp[0])
        if config.hidden_size % (kv[0] * r) == 0:
            return LlamaConfig(**src)
        fields = set(MistralConfig.__dataclass_fields__)
        kw = {k: v for k, v in src.items() if k in fields}
        kw["sliding_window"] = None
        return MistralConfig(**kw)
    if layout == "per-layer-mlp" and len(set(kv)) == 1:
        return _deci_config(src, kv[0], r, mlp)
    if getattr(config, "model_type", None) == "gqapruned_llama":
        base_heads, base_kv, base_mlp = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    else:
        base_heads, base_kv, base_mlp = config.num_attention_heads, n_kv_src, config.intermediate_size
    src.update(num_attention_heads=base_heads, num_key_value_heads=base_kv, intermediate_size=base_mlp)
    fields = set(GQAPrunedLlamaConfig.__dataclass_fields__)
    kw = {k: v for k, v in src.items() if k in fields}
    return GQAPrunedLlamaConfig(**kw, kv_heads_per_layer=list(kv), intermediate_size_per_layer=list(mlp))


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
