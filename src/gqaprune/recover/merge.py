"""Merge a LoRA adapter into its pruned base, check the result, save it like the base.

``merge_and_save_lora(pruned_model, lora_dir, output_dir)``:
  1. loads the base (any gqaprune model reference) in fp32 and checks that the adapter
     was made for it (module names and shapes; weight statistics when the adapter came
     from ``gqaprune finetune``);
  2. merges with PEFT's ``merge_and_unload`` (W += scale * B @ A per adapted Linear);
  3. checks every merged weight is finite and that the merged model's logits equal the
     adapter model's logits on a few inputs, within a stated tolerance;
  4. saves with ``gqaprune.models.io.save_checkpoint`` (atomic; a per-layer base stays
     per-layer with its remote code, a uniform one stays a stock Llama), in the base's dtype.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.models.adapters import adapter_files, check_adapter_matches
from gqaprune.models.io import dtype_name, is_per_layer, load_model, local_path, resolve_dtype, resolve_model_ref, \
    read_prune_plan, save_checkpoint, saved_dtype
from gqaprune.options import ModelArgs, opt
from gqaprune.outputs import check_output

log = logging.getLogger(__name__)

MERGE_INFO = "merge_info.json"


@dataclass
class MergeOptions(ModelArgs):
    """Options of ``merge_and_save_lora`` (one field per keyword argument)."""

    pruned_model: str | None = opt(None, "base (pruned) checkpoint the adapter was trained on",
                                   aliases=("--prune_model",))
    lora_dir: str | None = opt(None, "LoRA adapter folder (a finetune output_dir or one of its checkpoint-N folders)")
    output_dir: str | None = opt(None, "folder to write the merged checkpoint to")
    overwrite: bool = opt(False, "replace output_dir if gqaprune wrote it")
    check_inputs: int = opt(3, "random token sequences on which merged and adapter logits must agree")
    dtype: str | None = opt(None, "dtype to save the merged weights in: fp32, bf16, fp16 (default: the base "
                                  "checkpoint's); the merge itself runs in fp32")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.check_inputs < 1:
            raise GQAPruneError(f"--check_inputs {self.check_inputs}: must be >= 1")
        for name in ("pruned_model", "lora_dir", "output_dir"):
            if not getattr(self, name):
                what = {"pruned_model": "the pruned checkpoint the adapter was trained on",
                        "lora_dir": "the LoRA adapter folder written by fine-tuning",
                        "output_dir": "where to write the merged checkpoint"}[name]
                raise GQAPruneError(f"--{name} is required: {what}")


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


def merge_and_save_lora(pruned_model: str | None, lora_dir: str | None, output_dir: str | None, *,
                        allow_pickle: bool = False, overwrite: bool = False, check_inputs: int = 3,
                        device: str | None = None, dtype: str | None = None) -> MergeResult:
    """Merge the LoRA adapter in ``lora_dir`` into ``pruned_model``; check it and save to ``output_dir``.

    Raises GQAPruneError for missing inputs, an adapter made for another base, non-finite
    merged weights, or merged logits that differ from the adapter model's.
    """
    return merge(MergeOptions(pruned_model=pruned_model, lora_dir=lora_dir, output_dir=output_dir,
                              allow_pickle=allow_pickle, overwrite=overwrite, check_inputs=check_inputs,
                              device=device, dtype=dtype))


def merge(opts: MergeOptions) -> MergeResult:
    """check inputs -> load and check the adapter -> merge -> check the logits -> save."""
    adapter_cfg, weights = check_merge_inputs(opts)
    model, tokenizer = load_model(opts.pruned_model, dtype=torch.float32, device=opts.device,
                                  allow_pickle=opts.allow_pickle, flag="--pruned_model")
    warnings = check_adapter_matches(model, opts.lora_dir, weights, opts.pruned_model)
    peft_model = _apply_adapter(model, opts)
    merged, check = merged_and_checked(peft_model, model.config, opts)
    save_dtype = resolve_dtype(opts.dtype) if opts.dtype else (saved_dtype(opts.pruned_model) or torch.float32)
    result = MergeResult(
        output_dir=str(opts.output_dir), base=str(opts.pruned_model), lora_dir=str(opts.lora_dir),
        per_layer=is_per_layer(merged), saved_dtype=dtype_name(save_dtype), n_merged_modules=check.pop("n_merged"),
        check_inputs=opts.check_inputs, warnings=warnings, **check)
    save_merged(merged.to(save_dtype), tokenizer, opts, result, adapter_cfg)
    for w in warnings:
        log.warning(w)
    return result


def check_merge_inputs(opts: MergeOptions) -> tuple[dict, Path]:
    """The adapter's files, the base reference and the output folder, before anything is loaded."""
    adapter_cfg, weights = adapter_files(opts.lora_dir, "--lora_dir")
    resolve_model_ref(opts.pruned_model, "--pruned_model")
    check_output(opts.output_dir, flag="--output_dir", overwrite=opts.overwrite,
                 inputs={"--pruned_model": local_path(opts.pruned_model), "--lora_dir": opts.lora_dir})
    return adapter_cfg, weights


def _apply_adapter(model, opts: MergeOptions):
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(opts.lora_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise GQAPruneError(
            f"--lora_dir {opts.lora_dir}: PEFT could not apply the adapter to --pruned_model {opts.pruned_model} "
            f"({type(e).__name__}: {str(e)[:400]}). Was it trained on this base?"
        ) from e
    return peft_model.eval()


def merged_and_checked(peft_model, config, opts: MergeOptions):
    """(merged model, check figures): merge, then require finite weights and logits equal to the adapter's."""
    n_merged = sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    # Random token ids (fixed seed) exercise every adapted module; a real prompt adds nothing here.
    seq_len = min(32, int(getattr(config, "max_position_embeddings", 32) or 32))
    dev = next(peft_model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (opts.check_inputs, seq_len), generator=gen).to(dev)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, use_cache=False).logits.float()
        with peft_model.disable_adapter():
            effect = float((ref - peft_model(input_ids=ids, use_cache=False).logits.float()).abs().max())
    merged = peft_model.merge_and_unload()
    bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise GQAPruneError(
            f"--lora_dir {opts.lora_dir}: merging produced non-finite weights in {', '.join(bad[:5])}"
            f"{' and more' if len(bad) > 5 else ''}; the adapter itself holds NaN/inf (training diverged?). "
            "Merge an earlier checkpoint-N folder instead."
        )
    with torch.no_grad():
        diff = float((merged(input_ids=ids, use_cache=False).logits.float() - ref).abs().max())
    max_logit = float(ref.abs().max())
    # fp32: W x + s B A x and (W + s B A) x differ only by rounding, ~1e-6 relative per layer, but a
    # deep, badly damaged (heavily pruned) model amplifies it. A wrong merge (wrong scale, transposed or
    # missing factors) moves logits by about the adapter's own effect. So allow up to 1e-3 of the logit
    # scale, but never more than a tenth of what the adapter changes, and at least 1e-4.
    tol = max(1e-4 * max(1.0, max_logit), min(1e-3 * max(1.0, max_logit), 0.1 * effect))
    if not diff <= tol:
        raise GQAPruneError(
            f"--lora_dir {opts.lora_dir}: the merged model's logits differ from the adapter model's by {diff:.3g} "
            f"(tolerance {tol:.3g}); the merge is wrong for this base, nothing was saved."
        )
    log.info("merge check: max |merged - adapter| logits = %.3g <= %.3g on %d x %d tokens", diff, tol,
             opts.check_inputs, seq_len)
    merged.config.use_cache = True
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged, {"n_merged": n_merged, "check_seq_len": seq_len, "max_abs_diff": diff, "tolerance": tol,
                    "max_logit": max_logit, "adapter_effect": effect}


def save_merged(merged, tokenizer, opts: MergeOptions, result: MergeResult, adapter_cfg: dict) -> None:
    """Save like the base (per-layer stays per-layer), with the base's plan and a record of the merge."""
    base_dir, lora = Path(opts.pruned_model).expanduser(), Path(opts.lora_dir).expanduser()
    plan = read_prune_plan(base_dir)
    info = {"merged": result.to_dict(), "adapter_config": adapter_cfg,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    summary = lora / "finetune_summary.json"
    if summary.is_file():
        info["finetune_summary"] = json.loads(summary.read_text())
    extra = {MERGE_INFO: json.dumps(info, indent=2, default=str)}
    if plan is not None:
        from gqaprune.models.card import model_card
        from gqaprune.options import command_line

        ft = info.get("finetune_summary") or {}
        note = ["## Recovery", "", f"LoRA adapter `{lora.name}` merged into the pruned base `{base_dir.name}` "
                f"({result.n_merged_modules} modules; merged vs adapter logits max |diff| {result.max_abs_diff:.3g}, "
                f"tolerance {result.tolerance:.3g})."]
        if ft:
            note.append(f"Fine-tuning: {ft.get('global_step')} optimizer steps, {ft.get('train_tokens', 0):,} tokens, "
                        f"status {ft.get('status')}.")
        after = list((ft.get("ppl_after") or {}).values())
        extra["README.md"] = model_card(plan, folder_name=Path(opts.output_dir).name, per_layer=result.per_layer,
                                        command=command_line("gqaprune merge", opts), ppl_after=after,
                                        title="pruned, LoRA-recovered and merged", extra=note)
    save_checkpoint(merged, tokenizer, opts.output_dir, plan=plan, overwrite=opts.overwrite, kind="merge",
                    flag="--output_dir", extra_files=extra)


__all__ = ["MergeOptions", "MergeResult", "merge", "merge_and_save_lora", "check_adapter_matches"]
