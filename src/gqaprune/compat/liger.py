"""Liger fused kernels (RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy) for Llama-style training.

Targets liger-kernel 0.5-0.6 (``liger_kernel.transformers.apply_liger_kernel_to_llama``), CUDA only.
Each kernel is applied on its own, so a kernel that fails is reported by name and the rest
still apply; the report never says "none" when something was patched, nor "liger" when
something failed. Without the per-kernel application, one failing kernel would either
stop the run or leave it half-patched with no word.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)

TARGET = "liger-kernel>=0.5 (apply_liger_kernel_to_llama)"
KERNELS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")


def available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply(model, *, distill: bool) -> str:
    """Patch ``model`` kernel by kernel; returns what was applied and what failed."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    # fused linear + cross-entropy never materialises the logits; distillation needs them
    wanted = [k for k in KERNELS if not (distill and k == "fused_linear_cross_entropy")]
    done, failed = [], []
    for k in wanted:
        flags = {x: x == k for x in KERNELS} | {"cross_entropy": False}
        try:
            apply_liger_kernel_to_llama(model=model, **flags)
            done.append(k)
        except Exception as e:  # noqa: BLE001 - an optional speed-up: report which kernel failed and go on
            failed.append(f"{k} ({type(e).__name__}: {str(e)[:120]})")
            log.warning("Liger kernel %s failed: %s", k, e)
    if not done:
        return "none (every Liger kernel failed: " + "; ".join(failed) + ")"
    return "liger (" + ", ".join(done) + ")" + (f"; FAILED: {'; '.join(failed)}" if failed else "")
