"""Merge a LoRA adapter into its pruned base, check the result, save it like the base.

``merge_and_save_lora(pruned_model, lora_dir, output_dir)``:
  1. loads the base (any gqaprune model reference) in fp32 and checks that the adapter
     was made for it (module names and shapes; weight statistics when the adapter came
     from ``gqaprune finetune``);
  2. merges with PEFT's ``merge_and_unload`` (W += scale * B @ A per adapted Linear);
  3. checks every merged weight is finite and that the merged model's logits equal the
     adapter model's logits on a few inputs, within a stated tolerance;
  4. saves with ``gqaprune.model_io.save_checkpoint`` (atomic; a per-layer base stays
     per-layer with its remote code, a uniform one stays a stock Llama), in the base's dtype.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.options import opt

log = logging.getLogger(__name__)

ADAPTER_INFO = "gqaprune_adapter.json"
MERGE_INFO = "merge_info.json"
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeOptions:
    """Options of ``merge_and_save_lora`` (one field per keyword argument)."""

    pruned_model: str | None = opt(None, "base (pruned) checkpoint the adapter was trained on",
                                   aliases=("--prune_model",))
    lora_dir: str | None = opt(None, "LoRA adapter folder (a finetune output_dir or one of its checkpoint-N folders)")
    output_dir: str | None = opt(None, "folder to write the merged checkpoint to")
    allow_pickle: bool = opt(False, "allow a legacy pickled base model (runs code stored in the file)")
    overwrite: bool = opt(False, "replace output_dir if it exists")
    check_inputs: int = opt(3, "random token sequences on which merged and adapter logits must agree")
    device: str | None = opt(None, "device for the merge and the check (default: cuda if available, else cpu)")
    dtype: str | None = opt(None, "dtype to save the merged weights in: float32, bfloat16, float16 "
                                  "(default: the base checkpoint's)")


@dataclass
class MergeResult:
    output_dir: str
    base: str
    lora_dir: str
    per_layer: bool
    saved_dtype: str
    n_merged_modules: int
    check_inputs: int
    check_seq_len: int
    max_abs_diff: float          # merged vs adapter logits, fp32
    tolerance: float             # the check passes when max_abs_diff <= tolerance
    max_logit: float             # largest |logit| seen, the scale the tolerance is relative to
    adapter_effect: float        # max |adapter logits - base logits|: how much the adapter changes the model
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"merged {self.n_merged_modules} LoRA modules from {self.lora_dir} into {self.base}",
            f"  check: merged vs adapter logits on {self.check_inputs} x {self.check_seq_len} tokens: max |diff| "
            f"{self.max_abs_diff:.3g} <= tolerance {self.tolerance:.3g} (max |logit| {self.max_logit:.3g}; the "
            f"adapter moves logits by up to {self.adapter_effect:.3g})",
            f"  saved {'per-layer' if self.per_layer else 'uniform'} checkpoint ({self.saved_dtype}) to "
            f"{self.output_dir}",
        ]
        out += [f"  warning: {w}" for w in self.warnings]
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _adapter_files(lora_dir: Path) -> tuple[dict, Path]:
    cfg_path = lora_dir / "adapter_config.json"
    if not lora_dir.exists():
        raise GQAPruneError(f"--lora_dir {lora_dir}: no such folder; point it at a fine-tuning output_dir")
    if not cfg_path.is_file():
        ckpts = sorted(lora_dir.glob("checkpoint-*/adapter_config.json"),
                       key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
        hint = (f" It holds checkpoints; the newest is {ckpts[-1].parent} (pass that folder to merge it)."
                if ckpts else " Did the fine-tuning run finish?")
        raise GQAPruneError(f"--lora_dir {lora_dir}: no adapter_config.json, so it is not a LoRA adapter folder.{hint}")
    weights = lora_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise GQAPruneError(
            f"--lora_dir {lora_dir}: adapter_model.safetensors is missing (a .bin adapter is a pickle and is not "
            "loaded); re-save the adapter with safetensors."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise GQAPruneError(f"--lora_dir {lora_dir}: adapter_config.json is not valid JSON ({e})") from e
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise GQAPruneError(f"--lora_dir {lora_dir}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters merge")
    return cfg, weights


def check_adapter_matches(model, lora_dir: Path, weights: Path, base_label: str) -> list[str]:
    """Raise GQAPruneError when the adapter's modules or shapes do not fit ``model``; return warnings."""
    from safetensors import safe_open

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
            f"--lora_dir {lora_dir}: the adapter does not fit --pruned_model {base_label}: "
            + "; ".join(problems[:5]) + more + ". It was trained on another base model; pass the pruned "
            "checkpoint it was fine-tuned from."
        )
    if n_checked == 0:
        raise GQAPruneError(f"--lora_dir {lora_dir}: adapter_model.safetensors holds no LoRA weights")
    warnings = []
    info_path = lora_dir / ADAPTER_INFO
    if not info_path.is_file() and (lora_dir.parent / ADAPTER_INFO).is_file():
        info_path = lora_dir.parent / ADAPTER_INFO  # a checkpoint-N folder inside a run
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        fp = info.get("base_fingerprint", {})
        if fp.get("num_hidden_layers") not in (None, getattr(model.config, "num_hidden_layers", None)):
            raise GQAPruneError(
                f"--lora_dir {lora_dir}: trained on a base with {fp['num_hidden_layers']} layers, but --pruned_model "
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
                    f"--lora_dir {lora_dir}: the adapter was fine-tuned on a different base ({info.get('base_model')}):"
                    f" weight {name} has mean |w| {got:.6g} here but {ref:.6g} there. Pass the pruned checkpoint it "
                    "was trained on."
                )
    else:
        warnings.append(f"{lora_dir} has no {ADAPTER_INFO}; only module names and shapes were checked against "
                        "the base")
    return warnings


def _base_saved_dtype(ref: str) -> torch.dtype | None:
    p = Path(ref).expanduser()
    cfg = p / "config.json" if p.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return None
    return _DTYPE_NAMES.get(str(c.get("dtype") or c.get("torch_dtype") or ""))


def merge_and_save_lora(pruned_model: str | None, lora_dir: str | None, output_dir: str | None, *,
                        allow_pickle: bool = False, overwrite: bool = False, check_inputs: int = 3,
                        device: str | None = None, dtype: str | None = None) -> MergeResult:
    """Merge the LoRA adapter in ``lora_dir`` into ``pruned_model``; check it and save to ``output_dir``.

    Raises GQAPruneError for missing inputs, an adapter made for another base, non-finite
    merged weights, or merged logits that differ from the adapter model's.
    """
    if not pruned_model:
        raise GQAPruneError("--pruned_model is required: the pruned checkpoint the adapter was trained on")
    if not lora_dir:
        raise GQAPruneError("--lora_dir is required: the LoRA adapter folder written by fine-tuning")
    if not output_dir:
        raise GQAPruneError("--output_dir is required: where to write the merged checkpoint")
    if check_inputs < 1:
        raise GQAPruneError(f"--check_inputs {check_inputs}: must be >= 1")
    lora = Path(lora_dir).expanduser()
    out = Path(output_dir).expanduser()
    adapter_cfg, weights = _adapter_files(lora)
    if out.exists() and not overwrite:
        raise GQAPruneError(f"--output_dir {out}: exists; choose another folder or pass --overwrite")
    for other, flag in ((Path(pruned_model).expanduser(), "--pruned_model"), (lora, "--lora_dir")):
        if other.exists() and out.exists() and out.resolve() == other.resolve():
            raise GQAPruneError(f"--output_dir {out}: is the same folder as {flag}; write the merge elsewhere")
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise GQAPruneError(f"--dtype {dtype}: unknown; choose float32, bfloat16 or float16")

    from peft import PeftModel

    from gqaprune.model_io import is_per_layer, load_model, save_checkpoint

    try:
        model, tokenizer = load_model(pruned_model, dtype=torch.float32, device=device, allow_pickle=allow_pickle)
    except GQAPruneError as e:
        raise GQAPruneError(str(e).replace("--model ", "--pruned_model ", 1)) from e
    warnings = check_adapter_matches(model, lora, weights, pruned_model)
    saved_dtype = _DTYPE_NAMES[dtype] if dtype else (_base_saved_dtype(pruned_model) or torch.float32)
    per_layer = is_per_layer(model)

    try:
        peft_model = PeftModel.from_pretrained(model, str(lora), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise GQAPruneError(
            f"--lora_dir {lora}: PEFT could not apply the adapter to --pruned_model {pruned_model} "
            f"({type(e).__name__}: {str(e)[:400]}). Was it trained on this base?"
        ) from e
    peft_model.eval()
    n_merged = sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)

    # Random token ids (fixed seed) exercise every adapted module; a real prompt adds nothing here.
    seq_len = min(32, int(getattr(model.config, "max_position_embeddings", 32) or 32))
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (check_inputs, seq_len), generator=gen).to(dev)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, use_cache=False).logits.float()
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids, use_cache=False).logits.float()
    effect = float((ref - base_logits).abs().max())
    del base_logits

    merged = peft_model.merge_and_unload()
    bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise GQAPruneError(
            f"--lora_dir {lora}: merging produced non-finite weights in {', '.join(bad[:5])}"
            f"{' and more' if len(bad) > 5 else ''}; the adapter itself holds NaN/inf (training diverged?). "
            "Merge an earlier checkpoint-N folder instead."
        )
    with torch.no_grad():
        got = merged(input_ids=ids, use_cache=False).logits.float()
    diff = float((got - ref).abs().max())
    max_logit = float(ref.abs().max())
    # fp32: W x + s B A x and (W + s B A) x differ only by rounding, ~1e-6 relative per
    # layer, but a deep, badly damaged (heavily pruned) model amplifies it: seen 2e-4 of the
    # logit scale on SmolLM2 pruned 50%. A wrong merge (wrong scale, transposed or missing
    # factors) moves logits by about the adapter's own effect. So allow up to 1e-3 of the
    # logit scale, but never more than a tenth of what the adapter changes, and at least 1e-4.
    tol = max(1e-4 * max(1.0, max_logit), min(1e-3 * max(1.0, max_logit), 0.1 * effect))
    if not diff <= tol:
        raise GQAPruneError(
            f"--lora_dir {lora}: the merged model's logits differ from the adapter model's by {diff:.3g} "
            f"(tolerance {tol:.3g}); the merge is wrong for this base, nothing was saved."
        )
    log.info("merge check: max |merged - adapter| logits = %.3g <= %.3g on %d x %d tokens", diff, tol,
             check_inputs, seq_len)

    merged = merged.to(saved_dtype)
    merged.config.use_cache = True
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    base_dir = Path(pruned_model).expanduser()
    plan = None
    if base_dir.is_dir() and (base_dir / "prune_plan.json").is_file():
        plan = json.loads((base_dir / "prune_plan.json").read_text())
    result = MergeResult(
        output_dir=str(out), base=str(pruned_model), lora_dir=str(lora), per_layer=per_layer,
        saved_dtype=str(saved_dtype).replace("torch.", ""), n_merged_modules=n_merged, check_inputs=check_inputs,
        check_seq_len=seq_len, max_abs_diff=diff, tolerance=tol, max_logit=max_logit, adapter_effect=effect,
        warnings=warnings,
    )
    info = {"merged": result.to_dict(), "adapter_config": adapter_cfg,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    summary = lora / "finetune_summary.json"
    if summary.is_file():
        info["finetune_summary"] = json.loads(summary.read_text())
    save_checkpoint(merged, tokenizer, out, plan=plan, overwrite=overwrite,
                    extra_files={MERGE_INFO: json.dumps(info, indent=2, default=str)})
    for w in warnings:
        log.warning(w)
    return result


__all__ = ["MergeOptions", "MergeResult", "merge_and_save_lora", "check_adapter_matches"]
