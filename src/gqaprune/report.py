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


def _read_json(path):
    import json
    from pathlib import Path

    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def _ppl_text(p: dict) -> str:
    return (f"{p['ppl']:.2f} ({p['dataset']} {p['split']}, window {p['seq_len']}, stride {p['stride']}, "
            f"{p['n_tokens']:,} tokens)")


def write_run_report(root):
    """REPORT.md for a `gqaprune run` folder, from the files each step left there."""
    from pathlib import Path

    root = Path(root)
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
    out = root / "REPORT.md"
    out.write_text("\n".join(L) + "\n")
    return out
