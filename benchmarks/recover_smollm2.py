#!/usr/bin/env python
"""SmolLM2-135M (fp32, CPU): prune -> LoRA recovery -> merge, with perplexity and zero-shot before and after.

Writes benchmarks/results/recover_smollm2.md and .json (rewritten after every step, so a
run cut short keeps what it finished). For each configuration (ratio x layout):

  1. ``prune()`` (Taylor criterion, Alpaca calibration) -> ROOT/<cfg>/pruned (saved checkpoint);
  2. ``finetune()``: LoRA r 8 / alpha 16 on all 7 projection types, micro batch 4 = global batch 4
     (one micro batch per optimizer step), cutoff 256, --max-steps optimizer steps, wikitext2 as
     extra_val_dataset with a token cap -> ROOT/<cfg>/lora;
  3. ``merge_and_save_lora()`` -> ROOT/<cfg>/merged;
  4. WikiText-2 test PPL (window 128, stride 128, first --ppl-tokens tokens) of the pruned model,
     the pruned model + adapter and the merged model, on the same tokens as the dense model;
     zero-shot (lm-eval 0.4, local validation files under GQAPRUNE_DATA_DIR) of pruned and merged.

``--train-budget-s`` stops a fine-tuning run early (at an optimizer-step boundary) when its
training loop has used that many seconds; the table then says how many of the planned steps
ran. The learning-rate schedule is always the one planned for --max-steps. Nothing is
extrapolated: cells that were not measured say "not run (time)".

Run from the repository root:
    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/recover_smollm2.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASKS = "piqa,arc_easy,boolq"
NOT_RUN = "not run (time)"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default="0.5:per-layer,0.5:uniform,0.2:per-layer,0.2:uniform",
                   help="comma-separated ratio:layout, run in this order")
    p.add_argument("--root", default=str(REPO / "runs" / "recover_smollm2"), help="folder for checkpoints")
    p.add_argument("--out", default=str(HERE / "results" / "recover_smollm2"), help="results path stem (.md/.json)")
    p.add_argument("--num-samples", type=int, default=64, help="Alpaca calibration samples x 128 tokens")
    p.add_argument("--max-steps", type=int, default=200, help="planned LoRA optimizer steps")
    p.add_argument("--train-budget-s", type=float, default=None,
                   help="stop each fine-tuning run after this many seconds of training loop (default: no limit)")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-train-samples", type=int, default=2000, help="Alpaca records tokenised for training")
    p.add_argument("--val-set-size", type=int, default=40, help="held-out Alpaca records for the val loss")
    p.add_argument("--extra-val-max-tokens", type=int, default=2048, help="wikitext2 token cap inside finetune")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="WikiText-2 test tokens scored (window 128)")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=200, help="zero-shot examples per task")
    p.add_argument("--no-zeroshot", action="store_true")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="finetune --packing (padding-free micro-batches: same examples per step, same loss; "
                        "benchmarks/results/finetune_throughput.md measures the speed-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--finish-merge", action="store_true",
                   help="merge + evaluate the configs in the existing .json that were fine-tuned but not merged")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing .json and exit")
    return p.parse_args(argv)


def machine_info() -> dict:
    import peft
    from _common import machine_info as common

    return common(peft=peft.__version__)

# ------------------------------------------------------------------------------------- report

def _f(x, fmt="{:.3f}"):
    return NOT_RUN if x is None else fmt.format(x)


def _na(x):
    return "n/a" if x is None else f"{x:.4f}"


def _acc(zs: dict | None, task: str):
    if not zs:
        return None
    t = zs.get("tasks", {}).get(task)
    return None if t is None else t["acc"]


def write_report(state: dict, out_stem: Path) -> None:
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out_stem) + ".json").write_text(json.dumps(state, indent=2, default=str))
    a, m = state["args"], state["machine"]
    tasks = a["tasks"].split(",")
    dense = state.get("dense", {})
    L = ["# LoRA recovery of pruned SmolLM2-135M (fp32, CPU)", ""]
    L += [f"- **Date:** {state['date']} (finished: {state.get('finished') or 'cut short for time'})",
          f"- **Machine:** {m['cpu']}, {m['cores_visible']} cores visible, torch {m['torch_threads']} threads, "
          f"load average at start {m['loadavg_start']} (the cores are shared with other jobs, so timings are "
          f"noisy and pessimistic); Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
          f"peft {m['peft']}",
          f"- **Command:** `{state['command']}`",
          *([f"- **Completed by:** `{state['finish_merge_command']}` (the first command stopped with an exception "
             "when merge_and_save_lora refused a merge, before this script had its fallback; the second "
             "recomputed the adapter PPL, retried the library merge (refused again, recorded below) and "
             "evaluated PEFT's in-memory merge)"] if state.get("finish_merge_command") else []),
          f"- **Model:** `{a['model']}` (SmolLM2-135M-Instruct GGUF de-quantized to fp32), CPU",
          f"- **Pruning:** `prune()` Taylor criterion, Alpaca-cleaned calibration, {a['num_samples']} samples x 128 "
          "tokens; ratio = fraction of total parameters removed; each pruned checkpoint saved",
          f"- **LoRA:** r 8, alpha 16, dropout 0.05, targets q,k,v,o,gate,up,down; micro batch 4, global batch 4 "
          f"(one micro batch per optimizer step, no accumulation); cutoff 256; lr {a['learning_rate']:g} "
          "(not the guide's 5e-5, which is tuned for 128-sequence batches; with batch 4 and at most 200 steps a "
          "LoRA at 5e-5 barely moves, and 2e-4 is near alpaca-lora's 3e-4 default) "
          f"(linear warmup {a['warmup_steps']} steps, linear decay planned over {a['max_steps']} steps); "
          f"{a['max_train_samples']} Alpaca records tokenised, {a['val_set_size']} held out for the val loss; "
          f"extra_val_dataset wikitext2 capped at {a['extra_val_max_tokens']} tokens (evaluated at step 0 and the "
          "end only)" + ("; `--packing`: each micro batch's 4 examples in one row with positions restarting per "
                         "example (no padding, same loss)" if a.get("packing") else "; padded micro batches"),
          f"- **Planned steps:** {a['max_steps']}" + (
              f"; each fine-tuning run was stopped at the first optimizer-step boundary after {a['train_budget_s']:.0f} "
              "s of wall time since training began (time budget of this shared machine), so the steps column "
              "says how many actually ran"
              if a.get("train_budget_s") else ""),
          f"- **Perplexity:** WikiText-2 raw test, window 128, stride 128, the first {a['ppl_tokens']:,} tokens "
          "of the test stream (same tokens for every model)",
          f"- **Zero-shot:** lm-evaluation-harness 0.4, 0-shot, tasks {', '.join(tasks)}, `--limit "
          f"{a['limit']}` (the first {a['limit']} examples of each), from the offline local **validation** files "
          "under GQAPRUNE_DATA_DIR/zeroshot (ARC-Easy is lm-eval's test split on the Hub; this is validation); "
          "metric acc" if not a["no_zeroshot"] else "- **Zero-shot:** not run (--no-zeroshot)",
          ""]
    if a["limit"] != 200 and not a["no_zeroshot"]:
        zd = dense.get("zeroshot") or {}
        per = (f"{zd['wall_s'] / (a['limit'] * len(tasks)):.1f} s per example per task (measured on the dense "
               "model in this run)") if zd.get("wall_s") else "several seconds per example per task"
        L += [f"> Zero-shot used `--limit {a['limit']}`, not 200: at {per} on these shared "
              "cores, 200 x 3 tasks x (dense + pruned + merged per config) did not fit the time available. "
              f"With n={a['limit']} the standard error of an accuracy is about "
              f"{(0.25 / a['limit']) ** 0.5:.2f}, so differences below that are noise.", ""]
    L += ["## Perplexity (WikiText-2 test, window 128)", ""]
    L += ["| config | params kept | PPL dense | PPL pruned (before) | PPL adapter (after) | PPL merged (after) | "
          "merged vs adapter | LoRA steps run | train tokens/s | s / step | LoRA wall (s) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in state["configs"]:
        ft = c.get("finetune") or {}
        steps = f"{ft['global_step']} of {a['max_steps']}" if ft else NOT_RUN
        diff = NOT_RUN
        if c.get("ppl_adapter") and c.get("ppl_merged"):
            diff = f"{100 * (c['ppl_merged']['ppl'] / c['ppl_adapter']['ppl'] - 1):+.4f}%"
        kept = (f"{c['params_after']:,} ({100 * c['params_after'] / c['params_before']:.1f}%)"
                if c.get("params_after") else NOT_RUN)
        L.append(f"| {c['name']} | {kept} | {_f(dense.get('ppl', {}).get('ppl'))} | "
                 f"{_f((c.get('ppl_pruned') or {}).get('ppl'))} | {_f((c.get('ppl_adapter') or {}).get('ppl'))} | "
                 f"{_f((c.get('ppl_merged') or {}).get('ppl'))} | {diff} | {steps} | "
                 f"{_f(ft.get('tokens_per_second'), '{:.0f}')} | "
                 f"{_f(ft['train_seconds'] / ft['global_step'] if ft.get('global_step') else None, '{:.1f}')} | "
                 f"{_f(ft.get('wall_seconds'), '{:.0f}')} |")
    L += ["", "PPL adapter = pruned checkpoint + PEFT adapter (unmerged); PPL merged = the merged checkpoint "
          "reloaded from disk, or, where merge_and_save_lora refused (see In-run records), PEFT's "
          "merge_and_unload of the same adapter in memory. tokens/s = non-pad tokens fed forward / training-loop seconds (evaluations and "
          "checkpoint saves excluded); s / step = training-loop seconds / optimizer steps; LoRA wall = the whole "
          "finetune() call including its step-0 and final evaluations.", ""]
    if not a["no_zeroshot"]:
        L += [f"## Zero-shot accuracy (acc, limit {a['limit']} per task, local validation files)", ""]
        L += ["| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]

        def row(label, zs):
            vals = [_acc(zs, t) for t in tasks]
            mean = sum(vals) / len(vals) if zs and all(v is not None for v in vals) else None
            return f"| {label} | " + " | ".join(_f(v, "{:.3f}") for v in vals) + f" | {_f(mean, '{:.3f}')} |"

        L.append(row("dense", dense.get("zeroshot")))
        for c in state["configs"]:
            L.append(row(f"{c['name']} pruned", c.get("zs_pruned")))
            L.append(row(f"{c['name']} recovered (merged)", c.get("zs_merged")))
        L.append("")
    L += ["## In-run records", ""]
    for c in state["configs"]:
        ft = c.get("finetune")
        if not ft:
            continue
        pb, pa = ft.get("ppl_before", {}).get("wikitext2"), ft.get("ppl_after", {}).get("wikitext2")
        L.append(f"- **{c['name']}**: finetune status {ft['status']}, {ft['global_step']} steps, "
                 f"{ft['train_tokens']:,} train tokens in {ft['train_seconds']:.0f} s; final train loss "
                 f"{_na(ft.get('final_train_loss'))}; best val loss {_na(ft.get('best_eval_loss'))}"
                 + (f"; in-run wikitext2 PPL ({pb['n_tokens']:,} tokens) {pb['ppl']:.3f} -> "
                    f"{pa['ppl']:.3f}" if pb and pa else "")
                 + (f"; merge check max |logit diff| {c['merge']['max_abs_diff']:.3g} (tolerance "
                    f"{c['merge']['tolerance']:.3g})" if c.get("merge") else "")
                 + f"; prune wall {c.get('prune_wall_s', 0):.0f} s"
                 + (f"; PPL merged measured on: {c['merged_source']}" if c.get("merged_source") else ""))
        if c.get("merge_error"):
            L.append(f"  - **merge_and_save_lora refused to save the merge:** {c['merge_error']}")
    not_run = [c["name"] for c in state["configs"] if not c.get("finetune")]
    if not_run:
        L += ["", "Not run (time): " + ", ".join(not_run) + "."]
    if not state.get("finished"):
        L += ["", "The run was cut short for time after the configurations shown; nothing above is extrapolated."]
    L += ["", f"Checkpoints: `{a['root']}/<config>/{{pruned,lora,merged}}` (not committed).", ""]
    Path(str(out_stem) + ".md").write_text("\n".join(L))


# ------------------------------------------------------------------------------------- run

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        state = json.loads(Path(args.out + ".json").read_text())
        write_report(state, Path(args.out))
        return 0
    os.environ.setdefault("GQAPRUNE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch
    from transformers import TrainerCallback

    if args.threads:
        torch.set_num_threads(args.threads)

    from gqaprune.evaluate.perplexity import perplexity, tokenize_corpus
    from gqaprune.data.corpora import load_text_corpus
    from gqaprune.models.adapters import load_with_adapter
    from gqaprune.evaluate.zeroshot import zeroshot
    from gqaprune.recover.finetune import FinetuneOptions, finetune
    from gqaprune.recover.merge import merge_and_save_lora
    from gqaprune.models.io import load_model
    from gqaprune.prune.command import PruneOptions, prune

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    out_stem = Path(args.out)
    if args.finish_merge:
        state = json.loads(Path(args.out + ".json").read_text())
        model, tok = load_model(state["args"]["model"], dtype=torch.float32, device="cpu")
        del model
        args.ppl_tokens, args.limit, args.no_zeroshot = (state["args"]["ppl_tokens"], state["args"]["limit"],
                                                         state["args"]["no_zeroshot"])
        ids = tokenize_corpus(tok, load_text_corpus("wikitext2", "test").text)[: args.ppl_tokens]
        tasks = state["args"]["tasks"].split(",")
    state = state if args.finish_merge else {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": "GQAPRUNE_DATA_DIR=" + os.environ["GQAPRUNE_DATA_DIR"] + " python "
                        + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, REPO)] + sys.argv[1:]),
             "machine": machine_info(), "args": vars(args), "dense": {}, "configs": [], "finished": None}
    cfgs = []
    if not args.finish_merge:
        for spec in args.configs.split(","):
            ratio, layout = spec.split(":")
            name = f"{round(float(ratio) * 100)}% {layout}"
            cfgs.append((float(ratio), layout, name))
            state["configs"].append({"name": name, "ratio": float(ratio), "layout": layout})
        tasks = args.tasks.split(",")
    write_report(state, out_stem)
    t_all = time.perf_counter()

    def ppl(model, tok, ids):
        return perplexity(model, tok, "wikitext2", seq_len=128, ids=ids, max_tokens=args.ppl_tokens, batch_size=8,
                          progress=False).to_dict()

    def zs(model, tok):
        if args.no_zeroshot:
            return None
        t = time.perf_counter()
        r = zeroshot(model, tok, tasks, limit=args.limit, batch_size=8).to_dict()
        say(f"  zero-shot {r['mean_acc']:.3f} mean acc in {time.perf_counter() - t:.0f} s")
        return r

    # -- dense (once)
    if not args.finish_merge:
        say("dense: load")
        model, tok = load_model(args.model, dtype=torch.float32, device="cpu")
        ids = tokenize_corpus(tok, load_text_corpus("wikitext2", "test").text)[: args.ppl_tokens]
        t = time.perf_counter()
        state["dense"]["ppl"] = ppl(model, tok, ids)
        say(f"dense PPL {state['dense']['ppl']['ppl']:.3f} on {state['dense']['ppl']['n_tokens']} tokens "
            f"({time.perf_counter() - t:.0f} s)")
        write_report(state, out_stem)
        state["dense"]["zeroshot"] = zs(model, tok)
        write_report(state, out_stem)
        del model
        gc.collect()

    class TimeBudget(TrainerCallback):
        """Stop at an optimizer-step boundary once the training loop has run ``budget`` seconds."""

        def __init__(self, budget: float | None):
            self.budget, self.t0 = budget, None

        def on_train_begin(self, a, s, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, s, control, **kw):
            if self.budget is not None and time.perf_counter() - self.t0 > self.budget:
                say(f"  time budget {self.budget:.0f} s reached at step {s.global_step}: stopping")
                control.should_training_stop = True
            elif s.global_step % 10 == 0:
                say(f"  step {s.global_step} ({time.perf_counter() - self.t0:.0f} s)")
            return control

    def merge_and_eval(rec, d):
        """merge_and_save_lora, then PPL/zero-shot of the saved merge. If the library refuses the merge (its
        logit check), record the refusal and evaluate PEFT's merge_and_unload in memory instead, labelled so."""
        from gqaprune.errors import GQAPruneError

        try:
            mres = merge_and_save_lora(str(d / "pruned"), str(d / "lora"), str(d / "merged"), device="cpu",
                                       overwrite=True)
            rec["merge"] = mres.to_dict()
            model, tok = load_model(str(d / "merged"), dtype=torch.float32, device="cpu")
            rec["merged_source"] = "merged checkpoint reloaded from disk"
        except GQAPruneError as e:
            say(f"  merge_and_save_lora refused: {e}")
            rec["merge_error"] = str(e)
            model, tok = load_with_adapter(str(d / "pruned"), str(d / "lora"), dtype=torch.float32, device="cpu")
            model = model.merge_and_unload()
            rec["merged_source"] = "PEFT merge_and_unload in memory (merge_and_save_lora refused to save)"
        rec["ppl_merged"] = ppl(model, tok, ids)
        say(f"  merged PPL {rec['ppl_merged']['ppl']:.3f} ({rec['merged_source']})")
        write_report(state, out_stem)
        rec["zs_merged"] = zs(model, tok)
        write_report(state, out_stem)
        del model
        gc.collect()

    if args.finish_merge:  # configs fine-tuned by an earlier invocation whose merge step did not finish
        for rec in state["configs"]:
            if rec.get("finetune") and not rec.get("ppl_merged"):
                d = root / f"r{round(rec['ratio'] * 100)}_{rec['layout']}"
                if not rec.get("ppl_adapter"):
                    model, tok = load_with_adapter(str(d / "pruned"), str(d / "lora"), dtype=torch.float32,
                                                   device="cpu")
                    rec["ppl_adapter"] = ppl(model, tok, ids)
                    say(f"  adapter PPL {rec['ppl_adapter']['ppl']:.3f}")
                    write_report(state, out_stem)
                    del model
                    gc.collect()
                merge_and_eval(rec, root / f"r{round(rec['ratio'] * 100)}_{rec['layout']}")
        state["finish_merge_command"] = "python " + " ".join(shlex.quote(x) for x in sys.argv)
        write_report(state, out_stem)
        return 0

    for (ratio, layout, name), rec in zip(cfgs, state["configs"]):
        slug = f"r{round(ratio * 100)}_{layout}"
        d = root / slug
        say(f"== {name}: prune")
        t = time.perf_counter()
        pres = prune(PruneOptions(recipe="fast", model=args.model, output=str(d / "pruned"), pruning_ratio=ratio,
                                  criterion="taylor", layout=layout, calibration="alpaca",
                                  num_samples=args.num_samples, dtype="fp32", device="cpu", overwrite=True))
        rec.update(params_before=pres.params_before, params_after=pres.params_after,
                   prune_wall_s=round(time.perf_counter() - t, 1), layers=pres.layers)
        rec["ppl_pruned"] = ppl(pres.model, pres.tokenizer, ids)
        say(f"  pruned: {pres.params_after:,} params, PPL {rec['ppl_pruned']['ppl']:.3f}")
        write_report(state, out_stem)
        rec["zs_pruned"] = zs(pres.model, pres.tokenizer)
        write_report(state, out_stem)
        del pres
        gc.collect()

        say(f"== {name}: LoRA, {args.max_steps} planned steps")
        fres = finetune(FinetuneOptions(
            prune_model=str(d / "pruned"), data_path="yahma/alpaca-cleaned", output_dir=str(d / "lora"),
            max_steps=args.max_steps, learning_rate=args.learning_rate, batch_size=4, micro_batch_size=4,
            cutoff_len=256, val_set_size=args.val_set_size, warmup_steps=args.warmup_steps, lora_r=8,
            lora_alpha=16, extra_val_dataset=["wikitext2"], extra_val_max_tokens=args.extra_val_max_tokens,
            cache_dataset=True, max_train_samples=args.max_train_samples, eval_steps=0,
            save_steps=10**6, logging_steps=10, device="cpu", overwrite=True, packing=args.packing),
            callbacks=[TimeBudget(args.train_budget_s)])
        rec["finetune"] = fres.to_dict()
        say(f"  LoRA {fres.global_step} steps, {fres.tokens_per_second:.0f} tokens/s, "
            f"{fres.train_seconds / max(fres.global_step, 1):.1f} s/step")
        write_report(state, out_stem)

        model, tok = load_with_adapter(str(d / "pruned"), str(d / "lora"), dtype=torch.float32, device="cpu")
        rec["ppl_adapter"] = ppl(model, tok, ids)
        say(f"  adapter PPL {rec['ppl_adapter']['ppl']:.3f}")
        write_report(state, out_stem)
        del model
        gc.collect()
        merge_and_eval(rec, d)
        say(f"== {name} done ({time.perf_counter() - t_all:.0f} s since start)")

    state["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    state["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    write_report(state, out_stem)
    say(f"all done in {state['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
