"""``gqaprune export DIR --format gguf``: a checkpoint folder -> one GGUF file for llama.cpp / Ollama / LM Studio.

Written with the ``gguf`` package from the checkpoint's safetensors, config and tokenizer; the
model is never instantiated, so memory stays near one tensor at a time plus the output.

* **Arch** (``ARCHS``). Families whose math is Llama's (Llama, Mistral, Qwen2 with its q/k/v
  biases, Phi-3 with its fused projections split): same counts in every layer -> ``llama`` with
  scalar head counts and MLP width; counts that differ per layer (``--layout per-layer``) ->
  ``deci``, whose ``head_count``, ``head_count_kv`` and ``feed_forward_length`` are per-layer
  arrays (llama.cpp's other archs size every layer from layer 0 and refuse the shapes). Qwen2 and
  Phi-3 are not written as llama.cpp's ``qwen2`` / ``phi3``: those graphs assume query heads x
  head_dim = hidden size, which pruning breaks. Qwen3, Gemma-2 and Gemma-3 -> ``qwen3``,
  ``gemma2``, ``gemma3`` (uniform only), with Gemma's norms stored as 1 + weight, as llama.cpp
  reads them, and only where llama.cpp's fixed choices (Gemma's sliding-window pattern,
  query scale, local RoPE base) equal the checkpoint's; anything else is refused with the reason.
* **Heads.** ``attention.key_length`` / ``value_length`` and ``rope.dimension_count`` are always
  written, equal to head_dim: after pruning, query heads x head_dim is not the hidden size, and
  llama.cpp would otherwise derive head_dim from it ("invalid n_rot").
* **RoPE layout.** transformers' Llama rotates the two halves of each head (rotate_half);
  llama.cpp rotates adjacent pairs. q_proj and k_proj rows (and biases) are regrouped per head
  so that row ``h*d + 2i + j`` comes from ``h*d + j*d/2 + i`` (llama.cpp's converter does the
  same), with each layer's own head counts. Without it the file loads but the logits are wrong.
* **RoPE scaling.** Llama-3's ``rope_type: llama3`` becomes the ``rope_freqs`` tensor (per-frequency
  divisors, as llama.cpp reads them); ``linear`` becomes the scaling keys; others are refused.
* **Tied embeddings.** ``output.weight`` is written only when the checkpoint has ``lm_head.weight``;
  llama.cpp falls back to ``token_embd`` otherwise, which is what tying means.
* **Types** (``--outtype``): 1-D tensors (norms, biases, ``rope_freqs``) are always f32; the rest
  f32, f16, bf16 or q8_0 (gguf's numpy Q8_0 is bit-exact with ggml's). A row length Q8_0 cannot
  block (not a multiple of 32: an unrounded MLP width in ``ffn_down``) falls back to f16, as in
  llama.cpp's converter. ``--quantize TYPE`` then runs llama.cpp's own quantizer (quantize.py).
* **Never a half-written .gguf.** The file is written under a hidden temporary name beside the
  output and renamed when complete; the checkpoint folder is only read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gqaprune import __version__
from gqaprune.errors import GQAPruneError
from gqaprune.export import gguf_vocab
from gqaprune.models.family import family_for_type, family_of, layer_widths, supported
from gqaprune.models.layout import head_dim as config_head_dim
from gqaprune.options import Args, opt
from gqaprune.outputs import stale_files

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
FORMATS = ("gguf",)
GQAPRUNE_KEY = "gqaprune.version"   # marks a GGUF this tool wrote (only those may be overwritten)


@dataclass(frozen=True)
class Arch:
    """How one family is written: llama.cpp arch for the same counts in every layer and for per-layer counts
    (None: refused), whether q/k rows are regrouped for llama.cpp's pairwise RoPE, and what is added to norms."""

    uniform: str
    per_layer: str | None
    permute: bool = True
    norm_shift: float = 0.0


ARCHS = {"llama": Arch("llama", "deci"), "mistral": Arch("llama", "deci"), "qwen2": Arch("llama", "deci"),
         "phi3": Arch("llama", "deci"), "qwen3": Arch("qwen3", None, permute=False),
         "gemma2": Arch("gemma2", None, permute=False, norm_shift=1.0),
         "gemma3_text": Arch("gemma3", None, permute=False, norm_shift=1.0)}


def where_it_runs(family: str, per_layer: bool, layout: str | None = None) -> str:
    """One sentence: which engines serve a checkpoint of this family and shape (the prune summary, the model card)."""
    from gqaprune.models.family import FAMILIES

    fam, spec = FAMILIES[family], ARCHS[family]
    if not per_layer:
        return (f"uniform shapes: a stock {fam.label} config, so stock transformers and vLLM load it as it is, and "
                f"`gqaprune export --format gguf` writes it for llama.cpp / Ollama / LM Studio (arch {spec.uniform})")
    gguf = (f"`gqaprune export --format gguf` writes it for llama.cpp / Ollama / LM Studio (arch {spec.per_layer})"
            if spec.per_layer else f"llama.cpp has no per-layer {fam.label} arch, so it cannot be exported to GGUF")
    if layout == "per-layer-mlp":
        return ("same KV groups in every layer, MLP widths per layer, as DeciLM block_configs: vLLM's "
                f"DeciLMForCausalLM serves it, transformers loads it with trust_remote_code, and {gguf}")
    return (f"per-layer shapes: transformers loads it (trust_remote_code, or after import gqaprune) and {gguf}; stock "
            "vLLM cannot serve it (its per-layer model keeps the query heads global): use --layout uniform"
            + (" or --layout per-layer-mlp" if family == "llama" else "") + " for vLLM")


@dataclass
class ExportOptions(Args):
    checkpoint: str | None = opt(None, "checkpoint folder to export (a prune or merge output, or a stock folder of a "
                                       "supported family)")
    format: str = opt("gguf", "output format", choices=FORMATS)
    output: str | None = opt(None, "the .gguf file to write (its folder must exist)", aliases=("-o",))
    outtype: str = opt("f16", "tensor type of the weights (1-D tensors stay f32)", choices=OUTTYPES)
    quantize: str | None = opt(None, "then quantize with llama.cpp's quantizer (needs llama-cpp-python): Q4_K_M, "
                                     "Q5_K_M, Q8_0, Q4_0, ... (the f16/f32 file is kept beside it)")
    pre_tokenizer: str | None = opt(None, "llama.cpp pre-tokenizer name, when it cannot be read off the tokenizer "
                                          "(gpt-2, llama-bpe, smollm, ...)")
    overwrite: bool = opt(False, "replace the output file if gqaprune wrote it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.output:
            raise GQAPruneError("export: give --output FILE.gguf")
        if not str(self.output).endswith(".gguf"):
            raise GQAPruneError(f"--output {self.output}: name the file FILE.gguf")
        if self.quantize is not None:
            from gqaprune.export.quantize import check_type

            check_type(self.quantize)


@dataclass
class ExportResult:
    output: str
    arch: str
    outtype: str
    tensors: int
    bytes: int
    seconds: float
    vocab: dict
    per_layer: dict            # head_count, head_count_kv, feed_forward_length per layer
    quantized: str | None = None
    quantized_bytes: int | None = None

    def lines(self) -> list[str]:
        pl = self.per_layer
        kv = sorted(set(pl["head_count_kv"]))
        ff = (min(pl["feed_forward_length"]), max(pl["feed_forward_length"]))
        out = [f"wrote {self.output}: arch {self.arch}, {self.outtype}, {self.tensors} tensors, "
               f"{self.bytes / 2**20:,.1f} MiB in {self.seconds:.1f} s",
               f"  layers: {len(pl['head_count'])}, KV heads {kv[0]}-{kv[-1]}, MLP widths {ff[0]}-{ff[1]}; "
               f"tokenizer {self.vocab['tokens']:,} tokens, pre-tokenizer {self.vocab['pre_tokenizer']}"]
        if self.quantized:
            out.append(f"  quantized: {self.quantized} ({self.quantized_bytes / 2**20:,.1f} MiB)")
        out.append(f"  run it: llama-cli -m {self.quantized or self.output} -p \"Hello\"  (or load it in Ollama / "
                   "LM Studio / llama-cpp-python)")
        return out


# ------------------------------------------------------------------------------------------ checks
def check_export_inputs(opts: ExportOptions) -> tuple[Path, dict]:
    """(checkpoint folder, its config) after every check that needs no weights."""
    folder = Path(opts.checkpoint or "").expanduser()
    if opts.checkpoint is None or not folder.is_dir():
        raise GQAPruneError(f"export {opts.checkpoint}: no such folder; give a checkpoint folder (config.json + "
                            "model.safetensors)")
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise GQAPruneError(f"export {folder}: this is a LoRA adapter, not a model; merge it into its base "
                                f"first: gqaprune merge --pruned-model BASE --lora-dir {folder} --output-dir MERGED, "
                                "then export MERGED")
        raise GQAPruneError(f"export {folder}: no config.json, so it is not a checkpoint folder")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise GQAPruneError(f"export {folder}: config.json is not valid JSON ({e})") from e
    fam = family_for_type(cfg.get("model_type"))
    if fam is None or fam.name not in ARCHS:
        raise GQAPruneError(f"export {folder}: model_type {cfg.get('model_type')!r} is not a checkpoint of a family "
                            f"gqaprune exports; the GGUF export writes {supported()}")
    if not sorted(folder.glob("*.safetensors")):
        raise GQAPruneError(f"export {folder}: no .safetensors weights in the folder")
    out = Path(opts.output).expanduser()
    if not out.parent.is_dir():
        raise GQAPruneError(f"--output {out}: the folder {out.parent} does not exist; create it or choose another")
    if folder.resolve() in out.resolve().parents:
        raise GQAPruneError(f"--output {out}: lies inside the checkpoint folder; write the GGUF beside it instead")
    for f in [out] + ([quantized_path(out, opts.quantize)] if opts.quantize else []):
        _check_gguf_output(f, opts.overwrite)
    for s in stale_files(out):
        log.warning("%s looks like the leftover of an interrupted export; remove it if you do not need it", s)
    return folder, cfg


def _check_gguf_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise GQAPruneError(f"--output {out}: exists; choose another file or pass --overwrite")
    if not is_gqaprune_gguf(out):
        raise GQAPruneError(f"--output {out}: --overwrite replaces only a GGUF gqaprune wrote, and this one is "
                            "not (no gqaprune.version key); move it away or choose another file")


def is_gqaprune_gguf(path: Path) -> bool:
    from gguf import GGUFReader

    try:
        return GQAPRUNE_KEY in GGUFReader(str(path)).fields
    except (ValueError, OSError, IndexError, KeyError):   # not a readable GGUF: not ours
        return False


def quantized_path(out: Path, qtype: str) -> Path:
    return out.with_name(f"{out.stem}.{qtype}.gguf")


# ------------------------------------------------------------------------------------------ tensors
class _Tensors:
    """The checkpoint's tensors by name, read lazily from its safetensors files."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        self._open = []
        for f in sorted(folder.glob("*.safetensors")):
            try:
                self._open.append(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise GQAPruneError(f"export {folder}: {f.name} cannot be read ({e}); the checkpoint may be corrupt "
                                    "or incomplete: re-create or re-download it") from e
        self.where = {k: f for f in self._open for k in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise GQAPruneError(f"export: tensor {name} is missing from the checkpoint")
        return self.where[name].get_tensor(name).float()

    def shape(self, name: str) -> list[int]:
        return list(self.where[name].get_slice(name).get_shape())


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k (or their bias) from transformers' half-split RoPE layout to llama.cpp's pairwise one."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def layer_shapes(cfg: dict, t: _Tensors) -> dict:
    """Per layer: query heads, KV heads, MLP width, read from the weights (what llama.cpp will size by)."""
    d = config_head_dim(cfg)
    fam = family_of(cfg)
    out = {"head_count": [], "head_count_kv": [], "feed_forward_length": []}
    shapes = {k: t.shape(k) for k in t.where}
    for i in range(cfg["num_hidden_layers"]):
        q, k, _, _, mlp = layer_widths(fam, shapes, i)
        out["head_count"].append(q // d)
        out["head_count_kv"].append(k // d)
        out["feed_forward_length"].append(mlp)
    if min(out["feed_forward_length"]) < 1 or min(out["head_count_kv"]) < 1:
        # llama.cpp's deci skips a layer's attention result when its MLP width is 0; gqaprune's plans always keep
        # at least one channel and one KV group (--min-mlp >= 1)
        raise GQAPruneError("export: a layer keeps no MLP channel or no KV group; llama.cpp cannot run that shape")
    return out


def rope(cfg: dict) -> tuple[float, dict]:
    """(rope theta, scaling parameters) from a config.json in either spelling: transformers 5's
    ``rope_parameters`` (theta and scaling in one dict) or 4.x's ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):   # per layer type (Gemma-3): the global layers' RoPE
        params = dict(params["full_attention"])
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = dict(cfg.get("rope_scaling") or {}) or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = str(scaling.get("rope_type", scaling.get("type", "default"))).lower()
    return theta, ({} if kind == "default" else scaling)


def llama3_rope_freqs(cfg: dict, dim: int) -> np.ndarray | None:
    """Llama-3's RoPE scaling as llama.cpp takes it: one divisor per frequency (``rope_freqs``), or None."""
    base, rs = rope(cfg)
    if str(rs.get("rope_type", rs.get("type", ""))).lower() != "llama3":
        return None
    factor, lo, hi = float(rs.get("factor", 8.0)), float(rs.get("low_freq_factor", 1.0)), float(
        rs.get("high_freq_factor", 4.0))
    old = float(rs.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", 8192)))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < old / hi:
            out.append(1.0)
        elif wl > old / lo:
            out.append(factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------ writing
def _qtype(outtype: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def add_tensor(writer, name: str, w: torch.Tensor, outtype: str) -> None:
    """Add one tensor: 1-D in f32, the rest in ``outtype`` (Q8_0 rows not a multiple of 32 fall back to f16)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = w.detach().cpu().float().numpy()
    qtype = Q.F32 if a.ndim <= 1 else _qtype(outtype)
    if qtype == Q.Q8_0 and a.shape[-1] % 32:
        qtype = Q.F16
    data = quants.quantize(a, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype if qtype in (Q.BF16, Q.Q8_0) else None)


def _metadata(writer, cfg: dict, arch: str, shapes: dict, d: int, vocab_size: int, outtype: str, plan: dict | None,
              folder: Path) -> None:
    per_layer = arch == "deci"
    pick = (lambda k: list(map(int, shapes[k]))) if per_layer else (lambda k: shapes[k][0])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(pick("feed_forward_length"))
    writer.add_head_count(pick("head_count"))
    writer.add_head_count_kv(pick("head_count_kv"))
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    theta, rs = rope(cfg)
    writer.add_rope_freq_base(theta)
    kind = str(rs.get("rope_type", rs.get("type", ""))).lower() if rs else ""
    if kind == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rs["factor"]))
    elif kind not in ("", "default", "llama3"):
        raise GQAPruneError(f"export {folder}: rope_scaling type {kind!r} is not supported by the exporter yet "
                            "(llama3 and linear are)")
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if arch in ("gemma2", "gemma3"):
        if cfg.get("sliding_window"):
            writer.add_sliding_window(int(cfg["sliding_window"]))
        if cfg.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        if cfg.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(_file_type(outtype))
    _provenance(writer, cfg, plan, folder)


def check_family_rules(fam, cfg: dict, folder: Path) -> None:
    """Refuse what llama.cpp's graph for the family fixes differently from this checkpoint (it would load and
    compute something else)."""
    d = config_head_dim(cfg)
    n = cfg["num_hidden_layers"]
    why = []
    if fam.name in ("gemma2", "gemma3_text"):
        if cfg.get("query_pre_attn_scalar", d) != d:
            why.append(f"query_pre_attn_scalar {cfg.get('query_pre_attn_scalar')} != head_dim {d} (llama.cpp scales "
                       "queries by 1/sqrt(head_dim))")
        every = 2 if fam.name == "gemma2" else 6   # llama.cpp: layer i slides when i % every < every - 1
        want = ["sliding_attention" if i % every < every - 1 else "full_attention" for i in range(n)]
        if cfg.get("layer_types") not in (None, want):
            why.append(f"layer_types {cfg.get('layer_types')} are not llama.cpp's fixed pattern {want}")
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta",
                                                                                  cfg.get("rope_local_base_freq"))
        if fam.name == "gemma3_text" and local not in (None, 10000, 10000.0):
            why.append(f"the sliding layers' RoPE base is {local} (llama.cpp uses 10000)")
        if not cfg.get("tie_word_embeddings", True):
            why.append("lm_head is not tied to the embeddings (llama.cpp's Gemma has no separate output matrix)")
    if fam.name == "phi3":
        _, rs = rope(cfg)
        if rs or float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            why.append("its RoPE is scaled (longrope) or partial; written as llama.cpp's llama arch it would not be")
    if why:
        raise GQAPruneError(f"export {folder}: {fam.label} checkpoint that llama.cpp would run differently: "
                            + "; ".join(why))
    if ARCHS[fam.name].uniform == "llama" and cfg.get("sliding_window") and \
            int(cfg["sliding_window"]) < int(cfg.get("max_position_embeddings", 0)):
        log.warning("export %s: its %d-token sliding window is not written (llama.cpp's llama arch has none, as "
                    "with llama.cpp's own converter): outputs are the same up to %d tokens of context", folder,
                    int(cfg["sliding_window"]), int(cfg["sliding_window"]))


def _provenance(writer, cfg: dict, plan: dict | None, folder: Path) -> None:
    from gqaprune.models.card import base_model_info

    prov = (plan or {}).get("provenance", {})
    src = prov.get("source_model")
    base, lic = base_model_info(src) if src else (cfg.get("_name_or_path") or folder.name, None)
    writer.add_type("model")
    writer.add_name(f"{folder.name} (gqaprune)")
    writer.add_string(GQAPRUNE_KEY, __version__)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, str(base))
    if lic:
        writer.add_license(lic)
    summary = (f"pruned by gqaprune {prov.get('gqaprune_version', __version__)}: {prov.get('params_before', 0):,} -> "
               f"{prov.get('params_after', 0):,} parameters (-{prov.get('reduction', 0):.2%}), criterion "
               f"{prov.get('criterion', '?')}, layout {(plan or {}).get('layout', '?')}") if plan else \
        "exported by gqaprune (no prune plan in the folder)"
    writer.add_description(summary)
    writer.add_tags(["gqaprune", "pruned"] if plan else ["gqaprune"])


def layer_tensors(fam, spec: Arch, t: _Tensors, i: int, shapes: dict) -> list[tuple[str, torch.Tensor]]:
    """Layer ``i``'s tensors in llama.cpp's names: fused projections split (Phi-3), q/k regrouped for pairwise
    RoPE (llama/deci), Gemma's norms shifted."""
    p = f"model.layers.{i}."
    norms = {"attn_norm": fam.attn_norm, "ffn_norm": fam.mlp_norm, "post_attention_norm": fam.attn_out_norm,
             "post_ffw_norm": fam.mlp_out_norm, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    out = [(f"blk.{i}.{g}.weight", t.get(p + h + ".weight") + spec.norm_shift)
           for g, h in norms.items() if h and p + h + ".weight" in t]
    d = shapes["head_dim"]
    q, kv = shapes["head_count"][i] * d, shapes["head_count_kv"][i] * d
    parts = {"attn_q": ("self_attn.q_proj", None), "attn_k": ("self_attn.k_proj", None),
             "attn_v": ("self_attn.v_proj", None), "attn_output": ("self_attn.o_proj", None),
             "ffn_gate": ("mlp.gate_proj", None), "ffn_up": ("mlp.up_proj", None), "ffn_down": ("mlp.down_proj", None)}
    if p + "self_attn.qkv_proj.weight" in t:   # Phi-3: q rows, then k, then v; gate half, then up
        mlp = shapes["feed_forward_length"][i]
        parts.update({"attn_q": ("self_attn.qkv_proj", (0, q)), "attn_k": ("self_attn.qkv_proj", (q, q + kv)),
                      "attn_v": ("self_attn.qkv_proj", (q + kv, q + 2 * kv)),
                      "ffn_gate": ("mlp.gate_up_proj", (0, mlp)), "ffn_up": ("mlp.gate_up_proj", (mlp, 2 * mlp))})
    heads = {"attn_q": shapes["head_count"][i], "attn_k": shapes["head_count_kv"][i]}
    for g, (h, rows) in parts.items():
        for kind in ("weight", "bias"):
            key = p + h + "." + kind
            if key not in t:
                continue
            w = t.get(key)
            if rows is not None:
                w = w[rows[0]:rows[1]]
            if spec.permute and g in heads:
                w = permute_rope(w, heads[g])
            out.append((f"blk.{i}.{g}.{kind}", w))
    return out


def _tensors(writer, cfg: dict, t: _Tensors, shapes: dict, outtype: str) -> int:
    """Write every tensor in llama.cpp's names; returns how many."""
    fam = family_of(cfg)
    spec = ARCHS[fam.name]
    names = [("token_embd.weight", "model.embed_tokens.weight", 0.0),
             ("output_norm.weight", "model.norm.weight", spec.norm_shift)]
    if "lm_head.weight" in t:
        names.append(("output.weight", "lm_head.weight", 0.0))
    n = 0
    for gname, hname, shift in names:
        add_tensor(writer, gname, t.get(hname) + shift, outtype)
        n += 1
    freqs = llama3_rope_freqs(cfg, config_head_dim(cfg))
    if freqs is not None:
        writer.add_tensor("rope_freqs.weight", freqs)
        n += 1
    shapes = dict(shapes, head_dim=config_head_dim(cfg))
    for i in range(cfg["num_hidden_layers"]):
        for gname, w in layer_tensors(fam, spec, t, i, shapes):
            add_tensor(writer, gname, w, outtype)
            n += 1
    return n


def write_gguf(folder: Path, cfg: dict, out: Path, opts: ExportOptions) -> ExportResult:
    """Write the GGUF under a temporary name beside ``out`` and rename it into place."""
    from gguf import GGUFWriter

    t0 = time.perf_counter()
    t = _Tensors(folder)
    shapes = layer_shapes(cfg, t)
    fam = family_of(cfg)
    spec = ARCHS[fam.name]
    check_family_rules(fam, cfg, folder)
    uniform = all(len(set(v)) == 1 for v in shapes.values())
    arch = spec.uniform if uniform else spec.per_layer
    if arch is None:
        raise GQAPruneError(f"export {folder}: its layers differ in size, and llama.cpp's {spec.uniform} arch sizes "
                            f"every layer like the first (it has no per-layer {fam.label} arch); prune with --layout "
                            "uniform to export it to GGUF, or serve this checkpoint with transformers")
    plan_file = folder / "prune_plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    vocab_size = int(cfg["vocab_size"])
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    writer = GGUFWriter(None, arch)
    try:
        _metadata(writer, cfg, arch, shapes, config_head_dim(cfg), vocab_size, opts.outtype, plan, folder)
        vocab = gguf_vocab.write_vocab(writer, folder, vocab_size, pre=opts.pre_tokenizer,
                                       source_model=(plan or {}).get("provenance", {}).get("source_model"))
        n = _tensors(writer, cfg, t, shapes, opts.outtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as e:
        raise GQAPruneError(f"--output {out}: writing failed ({e.strerror or e}); the partial file was removed") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportResult(str(out), arch, opts.outtype, n, out.stat().st_size, round(time.perf_counter() - t0, 2),
                        vocab, shapes)


def export(opts: ExportOptions) -> ExportResult:
    """check -> write the GGUF -> quantize (when asked)."""
    folder, cfg = check_export_inputs(opts)
    if opts.quantize:
        from gqaprune.export.quantize import llama_cpp

        llama_cpp()   # installed? (fails with how to install it before the export runs)
    res = write_gguf(folder, cfg, Path(opts.output).expanduser(), opts)
    if opts.quantize:
        from gqaprune.export.quantize import quantize

        q = quantized_path(Path(res.output), opts.quantize)
        quantize(Path(res.output), q, opts.quantize)
        res.quantized, res.quantized_bytes = str(q), q.stat().st_size
    return res
