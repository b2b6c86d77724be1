"""The Markdown table of a bench result: speeds, memory, FLOPs ratios and efficiencies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def to_markdown(rows: Sequence, meta: dict[str, Any] | None = None) -> str:
    """A Markdown table of the rows (speedups and FLOPs ratios relative to the first model), with notes."""
    lines = []
    if meta:
        where = meta.get("gpu") or f"{meta.get('processor')}, {meta.get('cpu_threads')} threads"
        lines.append(
            f"Device {meta.get('device')} ({where}), {meta.get('dtype')}; prompt {meta.get('prompt_len')} tokens, "
            f"{meta.get('new_tokens')} new tokens; median of {meta.get('repeats')} runs after "
            f"{meta.get('warmup')} warm-up; torch {meta.get('torch')}, transformers {meta.get('transformers')}; "
            f"{meta.get('date')}. Baseline: {meta.get('baseline')}."
        )
        lines.append("")
    header = ["model", "params", "batch", "prefill tok/s", "decode tok/s", "peak mem",
              "FLOPs ratio prefill", "FLOPs ratio decode", "prefill speedup", "decode speedup",
              "prefill speedup / FLOPs speedup", "decode speedup / FLOPs speedup", "bytes ratio",
              "decode speedup / bytes speedup"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for r in sorted(rows, key=lambda r: r.batch):
        cells = [r.model, _fmt_count(r.params), str(r.batch), _fmt_rate(r.prefill_tok_s), _fmt_rate(r.decode_tok_s),
                 _fmt_bytes(r.peak_mem_bytes), f"{r.flops_ratio_prefill:.3f}", f"{r.flops_ratio_decode:.3f}",
                 f"{r.prefill_speedup:.2f}x", f"{r.decode_speedup:.2f}x",
                 f"{r.prefill_efficiency:.2f}", f"{r.decode_efficiency:.2f}", f"{r.bytes_ratio:.3f}",
                 f"{r.decode_bytes_efficiency:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    methods = sorted({r.mem_method for r in rows})
    lines += [
        "",
        "FLOPs ratio = analytical FLOPs per token of the model / the baseline's "
        "(prefill = 2·M_layers + 2·M_head/P + 4·A·(P+1)/2; decode = 2·M_layers + 2·M_head + 4·A·(P+(N+1)/2); "
        "M = matmul weights, A = Σ layers query heads × head_dim). "
        "FLOPs speedup = 1 / FLOPs ratio; the speedup / FLOPs-speedup columns are 1.00 when speed scales exactly "
        "with FLOPs. Bytes ratio = the model's weight bytes / the baseline's: decode streams every weight once per "
        "step, so when it is memory-bound its speedup is bounded by 1 / bytes ratio (last column 1.00 = reached).",
        f"Peak mem = the model's weights + peak extra memory of one prefill + decode run ({', '.join(methods)}).",
        "",
    ]
    return "\n".join(lines)
