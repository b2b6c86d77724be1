"""Model families: where each piece of a decoder layer sits (docs/architecture.md, "Families").

The units are the same in every family (a KV group with its query heads; an MLP channel); what
differs is only where their rows and columns live, which norms wrap the sublayers, and how the
config is rebuilt. One ``Family`` object per family says that, and scoring, surgery, the
layer-by-layer runner, compensation, export and LoRA ask it instead of naming modules:

* ``projections``: every Linear of a layer that holds units, with the axis and the segments
  along it (from models/pruned_gqa.py's ``PROJECTIONS``, the table the per-layer model code
  sizes layers by, so the two cannot disagree);
* the norms: ``attn_norm`` before attention, ``mlp_norm`` before the MLP, and Gemma's
  ``attn_out_norm`` / ``mlp_out_norm``, which normalise o_proj's / down_proj's output before the
  residual add (the "sandwich");
* ``kept_whole``: modules sized by head_dim and shared by every head (Qwen3's and Gemma-3's
  q_norm / k_norm), never sliced;
* ``stock_divisible``: the family's stock config refuses a hidden size that is not a multiple
  of the query heads (transformers 5's Llama and Gemma configs do), so such uniform shapes are
  written another way (prune/surgery.py says which);
* ``lora_targets``: the Linear names LoRA adapts by default, and ``plain_head``: whether the logits are exactly
  lm_head(norm(h)) (Gemma soft-caps them), which the chunked calibration loss relies on.

All families have ``self_attn.o_proj`` and ``mlp.down_proj`` (the projections that consume the
units), ``model.layers`` and ``model.norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.pruned_gqa import PROJECTIONS, get_module, per_layer_type, segment_width


@dataclass(frozen=True)
class Proj:
    """One Linear of a decoder layer that holds units: ``path`` from the layer, the axis the units lie along
    (``row`` = output features, ``col`` = input features) and its segments along that axis, in order."""

    path: str
    axis: str
    segments: tuple[str, ...]

    @property
    def kind(self) -> str:
        """``kv`` (attention: KV groups) or ``mlp`` (MLP channels)."""
        return "mlp" if self.segments[0] == "ch" else "kv"

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]


@dataclass(frozen=True)
class Family:
    name: str                              # the stock model_type
    label: str                             # for messages and --help
    example: str                           # a Hub id of the family
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_out_norm: str | None = None       # applied to o_proj's output before the residual add (Gemma)
    mlp_out_norm: str | None = None        # applied to down_proj's output before the residual add (Gemma)
    kept_whole: tuple[str, ...] = ()       # per-head-dim modules shared by all heads: never sliced
    stock_divisible: bool = False          # the stock config refuses hidden_size % query heads != 0
    plain_head: bool = True                # logits are exactly lm_head(norm(h)): no soft-capping or scaling
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")

    @property
    def projections(self) -> tuple[Proj, ...]:
        return tuple(Proj(*p) for p in PROJECTIONS[self.name])

    @property
    def per_layer_type(self) -> str:
        return per_layer_type(self.name)

    @property
    def sandwich(self) -> bool:
        return self.attn_out_norm is not None or self.mlp_out_norm is not None


_GEMMA = dict(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
              mlp_out_norm="post_feedforward_layernorm", stock_divisible=True, plain_head=False)
FAMILIES = {f.name: f for f in (
    Family("llama", "Llama (Llama-2/3, SmolLM2, ...)", "meta-llama/Meta-Llama-3-8B", stock_divisible=True),
    Family("mistral", "Mistral", "mistralai/Mistral-7B-v0.3"),
    Family("qwen2", "Qwen2 / Qwen2.5", "Qwen/Qwen2.5-0.5B"),
    Family("qwen3", "Qwen3", "Qwen/Qwen3-0.6B", kept_whole=("self_attn.q_norm", "self_attn.k_norm")),
    Family("gemma2", "Gemma-2", "google/gemma-2-2b", **_GEMMA),
    Family("gemma3_text", "Gemma-3 (text)", "google/gemma-3-1b-pt", kept_whole=("self_attn.q_norm", "self_attn.k_norm"),
           **_GEMMA),
    Family("phi3", "Phi-3", "microsoft/Phi-3-mini-4k-instruct",
           lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
)}
# model_type -> family: the stock types, gqaprune's per-layer types, and the DeciLM (per-layer-mlp) type
_BY_TYPE = {**{f.name: f for f in FAMILIES.values()}, **{f.per_layer_type: f for f in FAMILIES.values()},
            "nemotron-nas": FAMILIES["llama"]}


def supported() -> str:
    """The supported families, for messages."""
    return ", ".join(f.label for f in FAMILIES.values())


def family_for_type(model_type: str | None) -> Family | None:
    return _BY_TYPE.get(model_type or "")


def family_of(model_or_config) -> Family:
    """The family of a model or config (or config.json dict); GQAPruneError naming the supported ones."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    fam = family_for_type(mt)
    if fam is None:
        raise GQAPruneError(f"model_type {mt!r} is not a family gqaprune prunes; supported: {supported()}")
    return fam


def projection(layer, proj: Proj) -> torch.nn.Linear:
    return get_module(layer, proj.path)


def segment_widths(proj: Proj, n_kv: int, n_mlp: int, r: int, d: int) -> list[int]:
    return [segment_width(s, n_kv, r, d, n_mlp) for s in proj.segments]


def unit_index(proj: Proj, units, n_kv: int, n_mlp: int, r: int, d: int) -> torch.Tensor:
    """Indices along ``proj``'s axis of the given units (KV groups or channels), in every segment."""
    units = sorted(int(u) for u in units)
    parts, offset = [], 0
    for seg, width in zip(proj.segments, segment_widths(proj, n_kv, n_mlp, r, d)):
        per = {"q": r * d, "kv": d, "ch": 1}[seg]
        if units:
            parts.append(offset + (torch.tensor(units)[:, None] * per + torch.arange(per)[None]).reshape(-1))
        offset += width
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def reduce_to_units(t: torch.Tensor, proj: Proj, n_kv: int, n_mlp: int, r: int, d: int,
                    is_bias: bool = False) -> torch.Tensor:
    """Sum ``t`` (weight- or bias-shaped) over each unit's slice of ``proj`` -> shape (units,).

    A column projection's bias is per hidden unit, not per pruning unit: it contributes nothing.
    """
    n = n_mlp if proj.kind == "mlp" else n_kv
    if is_bias and proj.axis == "col":
        return torch.zeros(n, dtype=t.dtype, device=t.device)
    widths = segment_widths(proj, n_kv, n_mlp, r, d)
    total = torch.zeros(n, dtype=t.dtype, device=t.device)
    if proj.axis == "row" or is_bias:
        for part in t.split(widths, dim=0):
            total += part.reshape(n, -1).sum(1)         # rows are contiguous per unit in each segment
    else:
        for part in t.split(widths, dim=1):
            total += part.reshape(t.shape[0], n, -1).sum((0, 2))   # columns grouped per unit
    return total


def layer_widths(fam, shapes: dict[str, list[int]], i: int) -> tuple[int, int, int, int, int]:
    """Layer ``i``'s (q rows, k rows, v rows, o_proj inputs, MLP width) from tensor shapes, in any family's
    layout (a fused qkv_proj holds q, then k, then v: its k and v widths are what o_proj's width leaves)."""
    p = f"model.layers.{i}."
    o_in = shapes[p + "self_attn.o_proj.weight"][1]
    mlp = shapes[p + "mlp.down_proj.weight"][1]
    widths = {}
    for proj in fam.projections:
        shape = shapes[p + proj.path + ".weight"]
        width = shape[0] if proj.axis == "row" else shape[1]
        if proj.segments == ("q",) and proj.axis == "row":
            widths["q"] = width
        elif "kv" in proj.segments:
            n_kv_segs = proj.segments.count("kv")
            widths.setdefault("kv", []).append((width - o_in * proj.segments.count("q")) // n_kv_segs)
    kv = widths.get("kv", [0])
    return widths.get("q", o_in), kv[0], kv[-1], o_in, mlp
