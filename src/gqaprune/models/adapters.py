"""LoRA adapters, the one copy: find the files, check that an adapter fits its base, fingerprint a base,
and load base + adapter. Used by fine-tuning (fingerprint), merge, generate and eval.

A gqaprune fine-tuning run writes ``ADAPTER_INFO`` beside the PEFT files: the base it was
trained on and a fingerprint (adapted module shapes and a few weight statistics), so that
merging or loading the adapter onto another base is refused with a message instead of
silently producing a wrong model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gqaprune.errors import GQAPruneError

ADAPTER_INFO = "gqaprune_adapter.json"


def adapter_files(lora_dir: str | Path, flag: str = "--lora_dir") -> tuple[dict, Path]:
    """(adapter_config.json as a dict, the adapter_model.safetensors path); messages name ``flag``."""
    lora_dir = Path(lora_dir).expanduser()
    cfg_path = lora_dir / "adapter_config.json"
    if not lora_dir.exists():
        raise GQAPruneError(f"{flag} {lora_dir}: no such folder; point it at a fine-tuning output_dir")
    if not cfg_path.is_file():
        ckpts = sorted(lora_dir.glob("checkpoint-*/adapter_config.json"),
                       key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
        hint = (f" It holds checkpoints; the newest is {ckpts[-1].parent} (pass that folder)."
                if ckpts else " Did the fine-tuning run finish?")
        raise GQAPruneError(f"{flag} {lora_dir}: no adapter_config.json, so it is not a LoRA adapter folder.{hint}")
    weights = lora_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise GQAPruneError(
            f"{flag} {lora_dir}: adapter_model.safetensors is missing (a .bin adapter is a pickle and is not "
            "loaded); re-save the adapter with safetensors."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise GQAPruneError(f"{flag} {lora_dir}: adapter_config.json is not valid JSON ({e})") from e
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise GQAPruneError(f"{flag} {lora_dir}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters are "
                            "supported")
    return cfg, weights


def base_fingerprint(model, targets: list[str] | None = None) -> dict:
    """Shapes of the adapted Linear modules and a few weight statistics, to recognise the base later.

    Statistics are means of |w| in fp32, stable across bf16/fp32 loads to about 1e-3 relative.
    """
    shapes, stats = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (targets is None or any(name == t or name.endswith("." + t)
                                                                       for t in targets)):
            w = getattr(m, "base_layer", m).weight if hasattr(m, "base_layer") else m.weight
            shapes[name] = [int(w.shape[0]), int(w.shape[1])]
    named = dict(model.named_parameters())
    picks = [n for n in named if n.endswith("embed_tokens.weight")]
    picks += sorted(n for n in named if re.search(r"layers\.0\..*(q_proj|down_proj)\.(base_layer\.)?weight$", n))
    for n in picks:
        stats[re.sub(r"\.base_layer", "", n)] = float(named[n].detach().float().abs().mean())
    return {"model_type": getattr(model.config, "model_type", None),
            "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
            "shapes": shapes, "weight_abs_mean": stats}


def check_adapter_matches(model, lora_dir: str | Path, weights: Path, base_label: str, *,
                          flag: str = "--lora_dir", base_flag: str = "--pruned_model") -> list[str]:
    """Raise GQAPruneError when the adapter's modules or shapes do not fit ``model``; return warnings."""
    from safetensors import safe_open

    lora_dir = Path(lora_dir).expanduser()
    modules = dict(model.named_modules())
    problems, n_checked = [], 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not m:
                continue
            mod_name, which = m.group(1), m.group(2)
            mod = modules.get(mod_name)
            if mod is None or not isinstance(mod, torch.nn.Linear):
                problems.append(f"{mod_name}: no such Linear module in the base")
                continue
            shape = tuple(f.get_slice(key).get_shape())
            want = mod.in_features if which == "A" else mod.out_features
            got = shape[1] if which == "A" else shape[0]
            if got != want:
                side = "input" if which == "A" else "output"
                problems.append(f"{mod_name}: adapter {side} width {got}, base {want}")
            n_checked += 1
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise GQAPruneError(
            f"{flag} {lora_dir}: the adapter does not fit {base_flag} {base_label}: "
            + "; ".join(problems[:5]) + more + ". It was trained on another base model; pass the pruned "
            "checkpoint it was fine-tuned from."
        )
    if n_checked == 0:
        raise GQAPruneError(f"{flag} {lora_dir}: adapter_model.safetensors holds no LoRA weights")
    warnings = []
    info_path = lora_dir / ADAPTER_INFO
    if not info_path.is_file() and (lora_dir.parent / ADAPTER_INFO).is_file():
        info_path = lora_dir.parent / ADAPTER_INFO  # a checkpoint-N folder inside a run
    if not info_path.is_file():
        return [f"{lora_dir} has no {ADAPTER_INFO}; only module names and shapes were checked against the base"]
    try:
        info = json.loads(info_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise GQAPruneError(f"{flag} {lora_dir}: {info_path.name} is not valid JSON ({e})") from e
    fp = info.get("base_fingerprint", {})
    if fp.get("num_hidden_layers") not in (None, getattr(model.config, "num_hidden_layers", None)):
        raise GQAPruneError(
            f"{flag} {lora_dir}: trained on a base with {fp['num_hidden_layers']} layers, but {base_flag} "
            f"{base_label} has {model.config.num_hidden_layers}; pass the checkpoint it was fine-tuned from "
            f"({info.get('base_model')})."
        )
    named = {re.sub(r"\.base_layer", "", n): p for n, p in model.named_parameters()}
    for name, ref in fp.get("weight_abs_mean", {}).items():
        p = named.get(name)
        if p is None:
            continue
        got = float(p.detach().float().abs().mean())
        if abs(got - ref) > 1e-2 * max(abs(ref), 1e-8):
            raise GQAPruneError(
                f"{flag} {lora_dir}: the adapter was fine-tuned on a different base ({info.get('base_model')}): "
                f"weight {name} has mean |w| {got:.6g} here but {ref:.6g} there. Pass the pruned checkpoint it "
                "was trained on."
            )
    return warnings


def load_adapter(model, adapter_dir: str | Path, *, base_label: str = "the base model", flag: str = "--adapter",
                 base_flag: str = "--model", trainable: bool = False):
    """Wrap ``model`` in a PeftModel with the LoRA adapter in ``adapter_dir``, after checking that it fits.

    Returns ``(peft_model, warnings)``.
    """
    from peft import PeftModel

    path = Path(adapter_dir).expanduser()
    _cfg, weights = adapter_files(path, flag)
    warnings = check_adapter_matches(model, path, weights, base_label, flag=flag, base_flag=base_flag)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, missing target modules
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise GQAPruneError(
            f"{flag} {adapter_dir}: PEFT could not apply it to {base_flag} {base_label} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}). Use the pruned model this adapter was trained on."
        ) from err
    return peft_model.eval(), warnings


def load_with_adapter(model_ref: str, adapter: str | None, *, flag: str = "--model", adapter_flag: str = "--adapter",
                      **load_kw):
    """(model, tokenizer): the base from ``model_ref``, with a LoRA adapter applied when given."""
    from gqaprune.models.io import load_model

    model, tok = load_model(model_ref, flag=flag, **load_kw)
    if adapter:
        model, _warnings = load_adapter(model, adapter, base_label=model_ref, flag=adapter_flag, base_flag=flag)
    return model, tok
