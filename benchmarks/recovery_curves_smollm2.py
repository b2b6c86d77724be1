#!/usr/bin/env python
"""SmolLM2-135M: recovery methods at equal training-token budgets (issue 14, section 4).

    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/recovery_curves_smollm2.py \
        --student prune_log/recipes_bench/balanced_20_s0 [--tokens 32768] [--methods lora,kl,mixed,full,recon+lora]

Methods, all on the same Alpaca-cleaned training records (the held-out ones never among them), the
same global batch (8 sequences, cutoff 256, packed) and the same token budget:

* ``lora``      the seed's LoRA recipe (r 8, alpha 16, q/k/v/o/gate/up/down), LM loss on the responses;
* ``kl``        LoRA + logit KL from the dense model at alpha 1, temperature 1 (Minitron's loss);
* ``mixed``     LoRA + 0.5 x T^2 x KL (T = 2) + 0.5 x LM loss (gqaprune's --distill_from default);
* ``full``      every weight trained (``--full_finetune``), fp32 Adam;
* ``recon+lora`` the student with block-wise reconstruction (``gqaprune prune --plan`` of the student's own
  plan with ``--reconstruct-epochs``: the same kept units, then each layer trained towards its dense self),
  followed by ``lora`` at ``lora``'s learning rate.

Learning rates are chosen, per method, on the validation text only: a short run (``--sweep-tokens``) at
each rate of ``--sweep``, scored on the first ``--curve-tokens`` tokens of ``alpaca-heldout``; the rate
with the lowest PPL there is used for the full budget. Along each run the same held-out text and the
first ``--curve-tokens`` WikiText-2 test tokens are scored ``--points`` times (the curve, x = tokens
trained, counted by the trainer). Each final model (merged, for the LoRA methods) is then scored on the
whole WikiText-2 test at window 128 (as two halves, exactly the one-pass PPL) and, with ``--zeroshot``,
on the seven zero-shot tasks.

Resumable: each sweep point, run, merge and measurement is saved to OUT.json when it finishes, and a
finished fine-tuning folder is reused. A run whose folder is gone (a new machine) but whose measurements
are in the JSON is trained again only when its model is needed (``--zeroshot``): same settings, and the
new curve's largest relative difference from the recorded one is saved beside it (``retrained``).
``--sweep-from`` takes the sweep points another results file of this script measured on the same student;
``--zeroshot-from`` takes the dense model's zero-shot scores from one (same teacher and limit).
``--render`` redraws the Markdown and the PNG from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from _common import Measurer, cpu_name, log, prune_once, run_meta, whole, write_markdown  # noqa: E402  (benchmarks/ on sys.path)

METHODS = ("lora", "kl", "mixed", "full", "recon+lora")
DISTILL = {"kl": (1.0, 1.0), "mixed": (0.5, 2.0)}   # method -> (alpha, temperature)
DEFAULT_SWEEP = "lora=5e-4,2e-3;kl=5e-4,2e-3;mixed=5e-4,2e-3;full=2e-5,1e-4"
# Alpaca-cleaned examples average about 108 tokens in the fine-tuning template (recover_smollm2.json:
# 86,068 tokens in 800 examples); only used to turn a token budget into optimizer steps; the curves' x
# axis is the tokens the trainer counted.
TOKENS_PER_EXAMPLE = 108
BATCH = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="prune_log/recipes_bench/best_20_s0", help="pruned checkpoint to recover")
    p.add_argument("--teacher", default="smollm2-135m", help="the dense model (distillation teacher)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tokens", type=int, default=32768, help="training-token budget per method")
    p.add_argument("--points", type=int, default=3, help="evaluations along each run (besides step 0)")
    p.add_argument("--sweep", default=DEFAULT_SWEEP, help="method=lr,lr;... (recon+lora uses lora's choice)")
    p.add_argument("--sweep-tokens", type=int, default=8192, help="training tokens of each sweep run")
    p.add_argument("--curve-tokens", type=int, default=8192, help="tokens of each corpus scored along a curve")
    p.add_argument("--reconstruct-epochs", type=int, default=2)
    p.add_argument("--reconstruct-lr", type=float, default=1e-4)
    p.add_argument("--final", default="A128,B128", help="whole-test measurements of each final model")
    p.add_argument("--reuse", default="benchmarks/results/recipes_smollm2.json",
                   help="take the dense model's and the student's whole-test measurements from this results file when "
                        "it has them (the same Measurer on the same token ids); '' to measure them again")
    p.add_argument("--sweep-from", default="", metavar="FILE",
                   help="take the learning-rate sweep points of another results file of this script where its "
                        "student, --sweep-tokens and --curve-tokens are this run's (the same sweep); they are not run again")
    p.add_argument("--zeroshot", action="store_true", help="also the seven zero-shot tasks of each final model")
    p.add_argument("--zeroshot-limit", type=int, default=500)
    p.add_argument("--zeroshot-from", default="", metavar="FILE",
                   help="take the dense model's zero-shot scores from another results file of this script "
                        "(same teacher and --zeroshot-limit, checked) instead of scoring it again")
    p.add_argument("--work", default="prune_log/recovery_curves", help="folder for the runs (not committed)")
    p.add_argument("--out", default="benchmarks/results/recovery_curves_smollm2")
    p.add_argument("--also-running", default="nothing else of ours")
    p.add_argument("--render", action="store_true", help="only redraw the Markdown and PNG from the JSON")
    return p.parse_args(argv)


def steps_for(tokens: int) -> int:
    return max(1, round(tokens / (BATCH * TOKENS_PER_EXAMPLE)))


def parse_sweep(spec: str) -> dict[str, list[float]]:
    out = {}
    for part in filter(None, spec.split(";")):
        m, lrs = part.split("=")
        out[m.strip()] = [float(x) for x in lrs.split(",")]
    return out


def reuse(a, data: dict) -> None:
    """Copy the dense and student rows' whole-test halves from the recipes results, where they were measured."""
    path = Path(a.reuse) if a.reuse else None
    if path is None or not path.is_file():
        return
    src = json.loads(path.read_text())
    rows = {Path(r["folder"]).resolve(): name for name, r in src.get("rows", {}).items()}
    names = {"dense": "dense" if src.get("meta", {}).get("model") == a.teacher else None,
             "student": rows.get(Path(a.student).resolve())}
    for mine, theirs in names.items():
        got = {k: v for k, v in src.get("ppl", {}).get(theirs, {}).items() if k != "val"} if theirs else {}
        if got:
            data.setdefault("ppl", {}).setdefault(mine, {}).update(got)
            data.setdefault("reused", {})[mine] = f"{path.name}: row {theirs!r}"


def reuse_sweep(a, data: dict) -> None:
    """Copy the sweep points of ``--sweep-from`` (another results file of this script, same student and protocol)."""
    if not a.sweep_from:
        return
    src = json.loads(Path(a.sweep_from).read_text())
    theirs = src.get("meta", {}).get("args", {})
    same = (Path(theirs.get("student", "")).resolve() == Path(a.student).resolve()
            and (theirs.get("sweep_tokens"), theirs.get("curve_tokens")) == (a.sweep_tokens, a.curve_tokens))
    if not same:
        raise SystemExit(f"--sweep-from {a.sweep_from}: its student or sweep protocol ({theirs.get('student')}, "
                         f"{theirs.get('sweep_tokens')} sweep tokens, {theirs.get('curve_tokens')} curve tokens) is "
                         "not this run's; leave it out to run the sweep")
    for m, pts in src.get("sweep", {}).items():
        mine = data.setdefault("sweep", {}).setdefault(m, {})
        new = {lr: r for lr, r in pts.items() if lr not in mine}
        if new:
            mine.update(new)
            data.setdefault("sweep_reused", {})[m] = Path(a.sweep_from).name


def reuse_zeroshot(a, data: dict) -> None:
    """Copy the dense model's zero-shot scores from ``--zeroshot-from`` (another results file of this script):
    the teacher does not depend on the student, so its scores under the same protocol are the same measurement."""
    if not (a.zeroshot and a.zeroshot_from):
        return
    src = json.loads(Path(a.zeroshot_from).read_text())
    theirs = src.get("meta", {}).get("args", {})
    dense = src.get("zeroshot", {}).get("dense")
    if dense is None or (theirs.get("teacher"), dense.get("limit")) != (a.teacher, a.zeroshot_limit):
        raise SystemExit(f"--zeroshot-from {a.zeroshot_from}: no dense zero-shot scores of teacher {a.teacher} at "
                         f"--zeroshot-limit {a.zeroshot_limit} there; leave it out to score the dense model")
    zs = data.setdefault("zeroshot", {})
    if "dense" not in zs:
        zs["dense"] = dense
        data["zeroshot_reused"] = {"dense": Path(a.zeroshot_from).name}


def train(a, method: str, student: str, lr: float, tokens: int, folder: Path, points: int,
          corpora: tuple[str, ...] = ("alpaca-heldout", "wikitext2")) -> dict:
    """One fine-tuning run (reused when its folder finished); returns its curve and throughput."""
    from gqaprune.recover.finetune import finetune
    from gqaprune.recover.options import FinetuneOptions

    summary = folder / "finetune_summary.json"
    if not (summary.is_file() and json.loads(summary.read_text()).get("status") == "completed"):
        from gqaprune.recover.run_dir import last_checkpoint

        steps = steps_for(tokens)
        alpha, temp = DISTILL.get(method, (0.5, 2.0))
        # a run stopped part-way (the session's time, Ctrl-C) continues from its newest checkpoint, written
        # at every curve point; a folder without one is started again
        resume = "last" if last_checkpoint(folder) else None
        opts = FinetuneOptions(
            prune_model=student, output_dir=str(folder), overwrite=folder.exists() and resume is None,
            resume_from_checkpoint=resume, data_path="yahma/alpaca-cleaned",
            batch_size=BATCH, micro_batch_size=BATCH, packing=True, cutoff_len=256, val_set_size=0,
            max_train_samples=steps * BATCH + 64, max_steps=steps, warmup_steps=steps // 10,
            learning_rate=lr, eval_steps=max(1, steps // points), save_steps=max(1, steps // points), save_total_limit=1,
            logging_steps=max(1, steps // points), extra_val_dataset=list(corpora),
            extra_val_max_tokens=a.curve_tokens, seed=0, full_finetune=method == "full",
            distill_from=a.teacher if method in DISTILL else None, distill_alpha=alpha, distill_temperature=temp,
            device="cpu", bf16=False, cache_dataset=True)
        finetune(opts)
    s = json.loads(summary.read_text())
    curve, tokens_at = [], {}
    for ln in (folder / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        if "train/tokens_seen" in r:
            tokens_at[r["step"]] = int(r["train/tokens_seen"])
        if "eval/alpaca-heldout_ppl" in r or "eval/wikitext2_ppl" in r:
            pt = next((c for c in curve if c["step"] == r["step"]), None)
            if pt is None:
                pt = {"step": r["step"]}
                curve.append(pt)
            for k, name in (("eval/alpaca-heldout_ppl", "val"), ("eval/wikitext2_ppl", "wiki")):
                if k in r:
                    pt[name] = r[k]
    for pt in curve:
        pt["tokens"] = tokens_at.get(pt["step"], 0 if pt["step"] == 0 else None)
    # tokens trained: the curve's last count, which runs on across a resumption (the summary's is this invocation's)
    trained = max(tokens_at.values(), default=s["train_tokens"])
    return {"lr": lr, "folder": str(folder), "steps": s["global_step"], "train_tokens": trained,
            "train_s": s["train_seconds"], "tokens_per_s": s["tokens_per_second"], "status": s["status"],
            "final_train_loss": s["final_train_loss"], "curve": sorted(curve, key=lambda c: c["step"]),
            "method_record": {"full": s.get("method") == "full", "distill": s.get("distill")}}


def retrain(a, method: str, student: str, run: dict) -> None:
    """The run's folder is gone (a new machine, a cleaned work folder) but its measurements are in the JSON:
    train it again with the recorded settings (same records, seed, rate and steps) and record how the new
    curve compares with the recorded one, so that what is measured on the new model (zero-shot, say) is
    attributable to the recorded run, or visibly is not. The recorded curve stays the one reported."""
    if steps_for(a.tokens) != run["steps"]:
        raise SystemExit(f"{method}: --tokens {a.tokens} gives {steps_for(a.tokens)} steps, the recorded run took "
                         f"{run['steps']}; give the recorded run's --tokens to train it again")
    t = time.perf_counter()
    new = train(a, "lora" if method == "recon+lora" else method, student, run["lr"], a.tokens, Path(run["folder"]),
                points=a.points)
    rel = {k: max((abs(n[k] - o[k]) / o[k] for n, o in zip(new["curve"], run["curve"]) if k in n and k in o),
                  default=None) for k in ("val", "wiki")}
    run["retrained"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name(),
                        "wall_s": round(time.perf_counter() - t, 1), "tokens_per_s": new["tokens_per_s"],
                        "train_tokens": new["train_tokens"], "curve": new["curve"], "max_rel_diff": rel,
                        "also_running": a.also_running}
    log(f"{method}: trained again ({new['train_tokens']:,} tokens); its curve differs from the recorded one by at "
        f"most {rel['val']:.2e} (validation) and {rel['wiki']:.2e} (WikiText-2), relative")


def final_model(a, method: str, student: str, run: dict, save=lambda: None) -> str:
    """The recovered model as a checkpoint: the full run's own, or the adapter merged into its student
    (trained again first when the run's folder is gone: ``retrain``)."""
    folder = Path(run["folder"])
    merged = folder.parent / (folder.name + "_merged")
    done = folder / ("model/config.json" if method == "full" else "finetune_summary.json")
    if not done.is_file() and not (merged / "config.json").is_file():
        retrain(a, method, student, run)
        save()
    if method == "full":
        return str(folder / "model")
    if not (merged / "config.json").is_file():
        from gqaprune.recover.merge import merge_and_save_lora

        merge_and_save_lora(student, str(folder), str(merged), overwrite=merged.exists())
    return str(merged)


def reconstructed_student(a, env: dict) -> str:
    """The student's own plan replayed (same kept units, same refit) with block-wise reconstruction after it."""
    src = Path(a.student)
    folder = Path(a.work) / f"{src.name}_reconstructed_e{a.reconstruct_epochs}"
    prov = json.loads((src / "prune_plan.json").read_text())["provenance"]
    rec = prov.get("recipe") or {}
    settings = rec.get("settings") or {}
    cmd = [sys.executable, "-m", "gqaprune", "prune", "--model", a.teacher, "--plan", str(src / "prune_plan.json"),
           "--num-samples", str(settings.get("num_samples", 128)), "--seed", str(prov.get("seed", 0)),
           "--calibration-format", str(settings.get("calibration_format", "prompt")),
           "--reconstruct-epochs", str(a.reconstruct_epochs), "--reconstruct-lr", str(a.reconstruct_lr),
           "--device", "cpu", "--dtype", "fp32", "--output", str(folder)]
    if settings.get("compensate"):
        cmd.append("--compensate")
    prune_once(f"{src.name} + reconstruction", cmd, folder, env)
    return str(folder)


def true_share(rec: dict | None) -> float | None:
    """The share of 'true' answers among the BoolQ examples a zero-shot record scored (the first ``n`` of its
    local file); None where the record or its file is not here (a Hub source, another machine)."""
    if not rec or not Path(rec["source"]).is_file():
        return None
    with open(rec["source"]) as f:
        answers = [json.loads(line)["answer"] for _, line in zip(range(rec["n"]), f)]
    return sum(map(bool, answers)) / len(answers)


def tiers(dense_ppl: float, ppl: float) -> str:
    from gqaprune.evaluate.compare import tier_limits

    lim = tier_limits(dense_ppl)
    lo, hi = lim["perfect_ppl"]
    if ppl <= hi:
        return "perfect" if ppl >= lo else "perfect (below its range)"
    if ppl < lim["ideal_ppl"]:
        return "ideal"
    if ppl < lim["minimum_ppl"]:
        return "minimum"
    return f"none (minimum needs < {lim['minimum_ppl']:.2f}, {ppl / lim['minimum_ppl']:.2f}x over)"


def render(data: dict, stem: Path) -> None:
    meta, runs, ppl = data["meta"], data.get("runs", {}), data.get("ppl", {})
    tk = data.get("tokens", {})
    d128 = whole(ppl.get("dense", {}), 128)
    s128 = whole(ppl.get("student", {}), 128)
    a = meta["args"]
    what = (f"{next(iter(runs))} for {a['tokens']:,} training tokens" if len(runs) == 1
            else "recovery methods at equal training-token budgets")
    L = [f"# SmolLM2-135M, {data.get('student_desc', 'pruned')}: {what}", "",
         f"- date: {meta['date']}; command: `{meta['command']}` (git {meta['machine'].get('git')})",
         *[f"- earlier invocation: {e['date']}, `{e['command']}`" + (f" (on {e['cpu']})" if e.get("cpu") else "")
           for e in data.get("earlier_runs", [])],
         f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores_visible']} cores, torch "
         f"{meta['machine']['torch']}, fp32 on CPU; also running: {meta.get('also_running')}",
         f"- student: `{a['student']}` ({data.get('student_desc', '')}); teacher `{a['teacher']}`",
         f"- training: Alpaca-cleaned (held-out records excluded), global batch {BATCH} sequences, cutoff 256, packed, "
         f"seed 0, linear warmup (10% of steps) and decay; budget {a['tokens']:,} tokens per method "
         f"({steps_for(a['tokens'])} optimizer steps); the issue's goal is about 1,000,000",
         f"- learning rates chosen on validation only: {a['sweep_tokens']:,}-token runs at each rate of "
         f"`{a['sweep']}`, scored on the first {a['curve_tokens']:,} tokens of `alpaca-heldout`",
         f"- curves: `alpaca-heldout` (validation) and WikiText-2 test, first {a['curve_tokens']:,} tokens each, "
         "window 128 stride 128, at step 0 and every few steps; x = real tokens trained (the trainer's count)",
         f"- report: the whole WikiText-2 test ({tk.get('test', 0):,} tokens), window 128 stride 128, of each final "
         "model (LoRA methods: merged and reloaded), as two halves A/B (exactly the one-pass PPL)",
         "- tiers: the seed guide's limits scaled by dense / 19.66 (minimum < 1.53x dense, ideal < 1.27x, "
         "perfect 0.97-1.12x), on the whole-test window-128 PPL",
         *[f"- {k}'s whole-test halves taken from {v} (the same measurement code on the same token ids)"
           for k, v in data.get("reused", {}).items()],
         *[f"- {k}'s learning-rate sweep points taken from {v} (the same student, sweep and curve tokens)"
           for k, v in data.get("sweep_reused", {}).items()],
         *[f"- {k}'s zero-shot scores taken from {v} (the same model, tasks, examples and code)"
           for k, v in data.get("zeroshot_reused", {}).items()], ""]
    sw = data.get("sweep", {})
    if sw:
        L += ["## Learning-rate choice (validation)", "", "| method | lr | val PPL | tokens | chosen |",
              "|---|---:|---:|---:|---|"]
        for m, pts in sw.items():
            best = min(pts.values(), key=lambda r: r["val"])["lr"] if pts else None
            for lr, r in sorted(pts.items(), key=lambda kv: float(kv[0])):
                L.append(f"| {m} | {float(lr):g} | {r['val']:.2f} | {r['tokens']:,} | {'yes' if r['lr'] == best else ''} |")
        L.append("")
    # window 2048 beside 128 where the final models were measured at it (--final A2048,B2048)
    d2048 = whole(ppl.get("dense", {}), 2048)
    long = d2048 is not None and any(whole(ppl.get(m, {}), 2048) for m in runs)

    def w2048(name: str) -> str:
        w = whole(ppl.get(name, {}), 2048) if long else None
        return f" {w[0]:.2f} | {w[0] / d2048[0]:.2f} |" if w else (" | |" if long else "")

    L += ["## Results", "", "| method | lr | tokens trained | train tok/s | val PPL end | WikiText-2 PPL (whole test, w128) "
          "| × dense | A / B | tier |" + (" w2048 whole | × dense |" if long else ""),
          "|---|---:|---:|---:|---:|---:|---:|---|---|" + ("---:|---:|" if long else "")]
    if d128:
        L.append(f"| dense | | | | {ppl['dense'].get('val', {}).get('ppl', float('nan')):.2f} | {d128[0]:.2f} | 1.00 | "
                 f"{ppl['dense']['A128']['ppl']:.2f} / {ppl['dense']['B128']['ppl']:.2f} | |" + w2048("dense"))
    if s128 and d128:
        L.append(f"| pruned, no recovery | | 0 | | {ppl['student'].get('val', {}).get('ppl', float('nan')):.2f} | "
                 f"{s128[0]:.2f} | {s128[0] / d128[0]:.2f} | {ppl['student']['A128']['ppl']:.2f} / "
                 f"{ppl['student']['B128']['ppl']:.2f} | {tiers(d128[0], s128[0])} |" + w2048("student"))
    cpus = {r.get("cpu") for r in runs.values()}   # runs trained on different machines: name each beside tokens/s
    for m, r in runs.items():
        w = whole(ppl.get(m, {}), 128)
        speed = f"{r['tokens_per_s']:.0f}" + (f" ({r.get('cpu') or 'machine not recorded'})" if len(cpus) > 1 else "")
        end = r["curve"][-1].get("val") if r.get("curve") else None
        cells = [f"{w[0]:.2f}", f"{w[0] / d128[0]:.2f}",
                 f"{ppl[m]['A128']['ppl']:.2f} / {ppl[m]['B128']['ppl']:.2f}", tiers(d128[0], w[0])] \
            if w and d128 else ["not measured (time)", "", "", ""]
        L.append(f"| {m} | {r['lr']:g} | {r['train_tokens']:,} | {speed} | "
                 f"{'' if end is None else format(end, '.2f')} | " + " | ".join(cells) + " |" + w2048(m))
    zs = data.get("zeroshot", {})
    if zs:
        from gqaprune.evaluate.zeroshot import ZeroShotResult

        tasks = sorted({t for z in zs.values() for t in z["tasks"]})
        # examples scored per task (the same for every model: the first N of each local file, or all of a shorter one)
        n = {t: next(z["tasks"][t] for z in zs.values() if t in z["tasks"]) for t in tasks}
        L += ["", f"## Zero-shot (lm-eval {next(iter(zs.values())).get('lm_eval_version', '0.4')}, 0-shot, local "
              f"validation files, the first {a['zeroshot_limit']} examples of each task or all of a shorter file; "
              "acc ± its standard error)", "",
              "| model | " + " | ".join(f"{t} (n {n[t]['n']:,} of {n[t]['n_available']:,})" for t in tasks)
              + " | mean | mean without boolq | s |", "|---|" + "---:|" * (len(tasks) + 3)]
        for name, z in zs.items():
            res = ZeroShotResult.from_dict(z)
            means = [res.mean(), res.mean(exclude=("boolq",))]
            L.append(f"| {name} | " + " | ".join(
                f"{z['tasks'][t]['acc']:.3f} ± {z['tasks'][t]['acc_stderr']:.3f}" if t in z["tasks"] else ""
                for t in tasks) + "".join(f" | {m:.3f} ± {se:.3f}" for m, se in means) + f" | {z.get('wall_s', 0):.0f} |")
        share = true_share(n.get("boolq"))
        if share is not None:
            L += ["", f"BoolQ's examples scored here are {share:.2f} 'true' (always answering 'true' would score that); "
                  "a model below it does worse than that constant answer, so the mean without BoolQ is given too."]
    L += ["", "## Curves", "", f"![PPL against training tokens]({stem.name}.png)", "",
          "| method | step | tokens | val PPL | WikiText-2 PPL (first tokens) |", "|---|---:|---:|---:|---:|"]
    for m, r in runs.items():
        for c in r.get("curve", []):
            L.append(f"| {m} | {c['step']} | {c.get('tokens') or 0:,} | {c.get('val', float('nan')):.2f} | "
                     f"{c.get('wiki', float('nan')):.2f} |")
    write_markdown(stem.with_suffix(".md"), L, data.get("notes"))
    plot(data, stem.with_suffix(".png"))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data.get("runs", {})
    if not runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "val", "alpaca-heldout (validation)"),
                           (axes[1], "wiki", "WikiText-2 test, first tokens")):
        for m, r in runs.items():
            pts = [(c["tokens"], c[key]) for c in r.get("curve", []) if c.get("tokens") is not None and key in c]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{m} (lr {r['lr']:g})")
        dense = data.get("ppl", {}).get("dense", {})
        ref = dense.get("val", {}).get("ppl") if key == "val" else None
        if ref:
            ax.axhline(ref, color="grey", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("PPL (window 128)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M pruned: recovery at equal token budgets ({data['meta']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stem = Path(a.out)
    out = stem.with_suffix(".json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    if a.render:
        render(data, stem)
        return 0
    if "meta" in data:
        data.setdefault("earlier_runs", []).append({"date": data["meta"]["date"], "command": data["meta"]["command"],
                                                    "cpu": data["meta"]["machine"]["cpu"]})
    data["meta"] = run_meta(args=vars(a), also_running=a.also_running)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = out.with_suffix(".json.tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)
        render(data, stem)

    prov = json.loads((Path(a.student) / "prune_plan.json").read_text())["provenance"]
    data["student_desc"] = (f"{prov.get('reduction', 0):.1%} of parameters removed, recipe "
                            f"{(prov.get('recipe') or {}).get('name')}")
    reuse(a, data)
    reuse_sweep(a, data)
    reuse_zeroshot(a, data)
    measure = Measurer(a.curve_tokens, ["val"], data, save)
    measure("dense", a.teacher)
    measure("student", a.student)
    methods = [m for m in a.methods.split(",") if m]
    sweep = parse_sweep(a.sweep)
    chosen: dict[str, float] = {}
    for m in methods:
        base = "lora" if m == "recon+lora" else m
        lrs = sweep.get(base, [])
        pts = data.setdefault("sweep", {}).setdefault(base, {})
        for lr in lrs:
            if str(lr) in pts:
                continue
            r = train(a, base, a.student, lr, a.sweep_tokens, work / f"sweep_{base}_lr{lr:g}", points=1,
                      corpora=("alpaca-heldout",))
            pts[str(lr)] = {"lr": lr, "val": r["curve"][-1]["val"], "tokens": r["train_tokens"]}
            log(f"sweep {base} lr {lr:g}: validation PPL {pts[str(lr)]['val']:.2f}")
            save()
        chosen[m] = min(pts.values(), key=lambda r: r["val"])["lr"] if pts else 2e-4
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    finals = {}
    runs = data.setdefault("runs", {})
    for m in methods:
        student = reconstructed_student(a, env) if m == "recon+lora" else a.student
        if m not in runs:
            t = time.perf_counter()
            runs[m] = train(a, "lora" if m == "recon+lora" else m, student, chosen[m], a.tokens,
                            work / f"run_{m.replace('+', '_')}", points=a.points)
            runs[m]["wall_s"] = round(time.perf_counter() - t, 1)
            runs[m]["cpu"] = data["meta"]["machine"]["cpu"]   # tokens/s compare only on one kind of machine
            log(f"{m}: {runs[m]['train_tokens']:,} tokens, {runs[m]['tokens_per_s']:.0f} tok/s; curve "
                f"{[round(c.get('val', math.nan), 2) for c in runs[m]['curve']]}")
            save()
        finals[m] = (student, runs[m])
    final_keys = [k for k in a.final.split(",") if k]
    whole_test = Measurer(a.curve_tokens, final_keys, data, save)
    # the most promising on validation first: when time runs out, what is left unmeasured is the worst
    for m, (student, run) in sorted(finals.items(), key=lambda kv: kv[1][1]["curve"][-1].get("val", math.inf)):
        whole_test(m, lambda m=m, student=student, run=run: final_model(a, m, student, run, save))
    reuse(a, data)   # again: the recipes benchmark may have measured the student meanwhile
    for name, ref in (("dense", a.teacher), ("student", a.student)):
        whole_test(name, ref)
    if a.zeroshot:
        from gqaprune.evaluate.zeroshot import SUPPORTED_TASKS, zeroshot
        from gqaprune.models.io import load_model

        zs = data.setdefault("zeroshot", {})
        # dense and the student first: they need no training, where a final model may have to be trained again
        refs = [("dense", lambda: a.teacher), ("student", lambda: a.student)] + [
            (m, lambda m=m, s=s, r=r: final_model(a, m, s, r, save)) for m, (s, r) in finals.items()]
        for name, ref in refs:
            if name in zs:
                continue
            model, tok = load_model(ref(), dtype="fp32", device="cpu")
            zs[name] = zeroshot(model, tok, list(SUPPORTED_TASKS), limit=a.zeroshot_limit, batch_size=8).to_dict()
            log(f"zero-shot {name}: mean acc {zs[name]['mean_acc']:.3f}")
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
