"""Figures and Markdown for people: kept units per layer, training curves, run reports."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def kept_units_png(plan, title: str = "") -> bytes:
    """Bar chart (PNG bytes) of KV groups and MLP channels kept per layer, against the original."""
    n = len(plan.kv_groups)
    x = list(range(n))
    src = plan.source_shape
    r = src["q_per_kv"]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.3 * n + 2), 6), sharex=True)
    axes[0].bar(x, src["kv_per_layer"], color="#dddddd", label="original")
    axes[0].bar(x, plan.kept_kv, color="#3b7dd8", label="kept")
    axes[0].set_ylabel(f"KV groups (x{r} query heads)")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].bar(x, src["mlp_per_layer"], color="#dddddd", label="original")
    axes[1].bar(x, plan.kept_mlp, color="#e07b39", label="kept")
    axes[1].set_ylabel("MLP channels")
    axes[1].set_xlabel("layer")
    axes[1].legend(loc="lower right", fontsize=8)
    red = plan.provenance.get("reduction")
    fig.suptitle(f"{title}  ({plan.layout}, {red:.1%} of parameters removed)" if red is not None else title,
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
