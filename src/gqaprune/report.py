"""Figures and Markdown for people: kept units per layer, training curves, run reports (all figures here).

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas directly, so
nothing here changes matplotlib's process-wide backend or touches pyplot's global state.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def kept_units_png(plan, title: str = "") -> bytes:
    """Bar chart (PNG bytes) of KV groups and MLP channels kept per layer, against the original."""
    buf = io.BytesIO()
    kept_units_figure(plan, title).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def kept_units_figure(plan, title: str = ""):
    """The figure of ``kept_units_png``: integer ticks, the legend above the bars."""
    from matplotlib.ticker import MaxNLocator

    n = len(plan.kv_groups)
    x = list(range(n))
    src = plan.source_shape
    r = src["q_per_kv"]
    fig = _figure(figsize=(max(6, 0.3 * n + 2), 6.4))
    axes = fig.subplots(2, 1, sharex=True)
    axes[0].bar(x, src["kv_per_layer"], color="#dddddd", label="original")
    axes[0].bar(x, plan.kept_kv, color="#3b7dd8", label="kept")
    axes[0].set_ylabel(f"KV groups (x{r} query heads)")
    axes[1].bar(x, src["mlp_per_layer"], color="#dddddd", label="original")
    axes[1].bar(x, plan.kept_mlp, color="#e07b39", label="kept")
    axes[1].set_ylabel("MLP channels")
    axes[1].set_xlabel("layer")
    for ax in axes:   # counts and layers are whole numbers; the legend sits above the bars, never on one
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, fontsize=8, frameon=False)
    red = plan.provenance.get("reduction")
    fig.suptitle(f"{title}  ({plan.layout}, {red:.1%} of parameters removed)" if red is not None else title,
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss (train, val) and perplexity curves against the optimizer step, as a PNG."""
    if not metrics_path.is_file():
        return None
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    series: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        for k, v in r.items():
            if k in ("train/loss", "eval/loss") or (k.startswith("eval/") and k.endswith("_ppl")):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    series.setdefault(k, []).append((int(r["step"]), float(v)))
    if not series:
        return None
    ppl_keys = sorted(k for k in series if k.endswith("_ppl"))
    ncols = 2 if ppl_keys else 1
    fig = _figure(figsize=(6 * ncols, 4))
    axes = fig.subplots(1, ncols, squeeze=False)
    ax = axes[0][0]
    for k, style in (("train/loss", "-"), ("eval/loss", "o-")):
        if k in series:
            xs, ys = zip(*series[k])
            ax.plot(xs, ys, style, label=k, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("LoRA fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if ppl_keys:
        ax = axes[0][1]
        protos = {}
        for r in recs:
            for k in ppl_keys:
                if k + "_protocol" in r:
                    protos[k] = r[k + "_protocol"]
        for k in ppl_keys:
            xs, ys = zip(*series[k])
            p = protos.get(k)
            lab = k + (f" ({p['dataset']} {p['split']}, window {p['seq_len']}, stride {p['stride']}, "
                       f"{p['n_tokens']:,} tok)" if p else "")
            ax.plot(xs, ys, "o-", label=lab, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity during fine-tuning")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


def _read_json(path):
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def _ppl_text(p: dict) -> str:
    return (f"{p['ppl']:.2f} ({p['dataset']} {p['split']}, window {p['seq_len']}, stride {p['stride']}, "
            f"{p['n_tokens']:,} tokens)")


def write_run_report(root):
    """REPORT.md for a `gqaprune run` folder, from the files each step left there."""
    from gqaprune.errors import GQAPruneError
    from gqaprune.outputs import atomic_write, read_manifest

    root = Path(root).expanduser()
    if not root.is_dir():
        raise GQAPruneError(f"report {root}: no such folder; give the --output-root of a `gqaprune run`")
    if (read_manifest(root) or {}).get("kind") != "run" and not (root / "run_options.json").is_file():
        raise GQAPruneError(f"report {root}: not the output root of a `gqaprune run` (no run_options.json); "
                            "nothing was written")
    opts = _read_json(root / "run_options.json") or {}
    steps = _read_json(root / "run_steps.json") or []
    prune = _read_json(root / "pruned" / "prune_summary.json")
    plan = _read_json(root / "pruned" / "prune_plan.json")
    ft = _read_json(root / "lora" / "finetune_summary.json")
    merge = _read_json(root / "merged" / "merge_info.json")
    ev = _read_json(root / "eval" / "eval.json")
    quick = opts.get("profile") == "quick"
    L = [f"# gqaprune run: `{opts.get('model', '?')}` -> `{root}`", ""]
    if quick:
        L += ["> **Quick profile.** Steps, calibration and evaluation were cut so the pipeline finishes in minutes "
              "on a CPU: few fine-tuning steps, perplexity on the first tokens only, zero-shot tasks on a few "
              "examples. The numbers show that the pipeline works, not the quality a full run reaches.", ""]
    if steps:
        L += ["| step | status | seconds | folder |", "|---|---|---|---|"]
        L += [f"| {s['step']} | {s['status']} | {s['seconds']} | `{s['folder']}` |" for s in steps]
        L.append("")
    if prune:
        red = prune.get("reduction", 0)
        L += ["## Pruning", "",
              f"- parameters {prune['params_before']:,} -> {prune['params_after']:,} (-{red:.2%})",
              f"- criterion {plan['provenance'].get('criterion') if plan else '?'}, layout "
              f"{plan['layout'] if plan else '?'}; calibration: {plan['provenance'].get('calibration') if plan else '?'}",
              f"- wall time {prune['wall_s']:.0f} s, peak RSS {prune['peak_rss_mb']:,.0f} MiB"]
        L += [f"- {n}" for n in prune.get("notes") or []]  # compensation, sensitivity, split, steps, search
        for b, a in zip(prune.get("ppl_before", []), prune.get("ppl_after", [])):
            L.append(f"- PPL before {_ppl_text(b)} -> after pruning {a['ppl']:.2f} ({a['ppl'] / b['ppl']:.2f}x)")
        L += ["", "![kept units per layer](pruned/kept_units.png)", ""]
    if ft:
        L += ["## LoRA recovery", "",
              f"- {ft['status']}: {ft['global_step']} optimizer steps, {ft['train_examples']:,} train examples, "
              f"grad accumulation {ft['grad_accum']}, {ft['precision']}",
              f"- {ft['train_tokens']:,} tokens at {ft['tokens_per_second']:,.0f} tokens/s; best val loss "
              f"{ft['best_eval_loss'] if ft['best_eval_loss'] is not None else 'n/a'}"]
        for name in ft.get("ppl_after", {}):
            b, a = ft["ppl_before"].get(name), ft["ppl_after"][name]
            L.append(f"- PPL {name}: {b['ppl']:.2f} -> {_ppl_text(a)}" if b else f"- PPL {name}: {_ppl_text(a)}")
        if ft.get("plot_path"):
            L += ["", f"![training curves](lora/{Path(ft['plot_path']).name})"]
        L.append("")
    if merge:
        chk = merge.get("merged") or {}
        L += ["## Merge", "", f"- merged checkpoint: `{root / 'merged'}`" +
              (f"; merged vs adapter logits max |diff| {chk.get('max_abs_diff'):.3g} (tolerance {chk.get('tolerance'):.3g})"
               if chk.get("max_abs_diff") is not None else ""), ""]
    eval_md = root / "eval" / "eval.md"
    if ev and eval_md.is_file():
        L += ["## Evaluation: original vs pruned vs recovered", "", eval_md.read_text().replace("# Evaluation", "").strip(), ""]
        comp = ev.get("comparison")
        if comp:
            L += [f"**Verdict: {comp['verdict']}**" + (f" (tiers scaled by {comp['scale_factor']:.3f} = original PPL / "
                                                         f"{comp['reference_ppl']})" if comp.get("scaled") else ""), ""]
    return atomic_write(root / "REPORT.md", "\n".join(L) + "\n")
