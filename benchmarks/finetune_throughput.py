#!/usr/bin/env python
"""LoRA fine-tuning throughput on SmolLM2 (CPU): the plain baseline vs --group_by_length vs --packing.

Every variant runs ``gqaprune.finetune.finetune`` in this one process, on the same
checkpoint, the same Alpaca examples (exactly one pass over ``steps x batch`` records,
so every variant trains on the same set) and the same number of optimizer steps:

* baseline: Trainer + PEFT, random batches right-padded per batch, no length grouping,
  no packing (what LLM-Pruner's post_training.py does);
* group_by_length: the Trainer's length-grouped sampler (same examples, another order);
* packing: padding-free micro-batches (one row per micro-batch, positions restart per
  example, block-diagonal causal attention); same batches as the baseline;
* both.

Reported: real (non-pad) tokens per second of the training loop (wall clock, and per
CPU-second of this process, which is less sensitive to other jobs on a shared machine),
the share of positions that were padding, and loss per token: the mean training loss
over the run and the validation loss at the end (the same held-out examples, always
padded, for every variant). Liger fused kernels are detected and reported (they need
CUDA; on CPU there are none).

Run from the repository root (about 30-60 minutes on 2 shared CPU cores):
    gqaprune prune --model smollm2-135m --pruning-ratio 0.5 --layout per-layer --output /tmp/smol_pl50
    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/finetune_throughput.py --model /tmp/smol_pl50
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

VARIANTS = {
    "baseline": dict(group_by_length=False, packing=False),
    "group_by_length": dict(group_by_length=True, packing=False),
    "packing": dict(group_by_length=False, packing=True),
    "group_by_length+packing": dict(group_by_length=True, packing=True),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint to fine-tune (default: dense SmolLM2-135M)")
    p.add_argument("--data", default="yahma/alpaca-cleaned", help="instruction data (offline via GQAPRUNE_DATA_DIR)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--val-set-size", type=int, default=32, help="held-out examples for the final val loss")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="0 (default) so padded and packed runs draw no dropout masks and can be compared step by step")
    p.add_argument("--warmup-run-steps", type=int, default=2,
                   help="an unmeasured baseline run first, so the first measured variant pays no one-off costs")
    p.add_argument("--repeat-baseline", action="store_true", help="run the baseline again at the end (drift check)")
    p.add_argument("--workdir", default="/tmp/gqaprune_ft_throughput", help="run folders (adapters, metrics)")
    p.add_argument("--output", default=str(HERE / "results" / "finetune_throughput.md"))
    p.add_argument("--notes-file", help="Markdown appended under '## Notes' when the run ends")
    return p.parse_args(argv)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs visible (shared with other jobs), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads")


def make_clock():
    """A TrainerCallback measuring wall and process CPU time of the training loop only."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        wall = cpu = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self._w, self._c = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kw):
            self.wall = time.perf_counter() - self._w
            self.cpu = time.process_time() - self._c

    return Clock()


def run_variant(name: str, a, workdir: Path, steps: int | None = None) -> dict:
    from gqaprune.finetune import FinetuneOptions, finetune

    batch = a.micro_batch_size * a.grad_accum
    steps = steps or a.steps
    out = workdir / name.replace(" ", "_").replace("(", "").replace(")", "")
    opts = FinetuneOptions(
        prune_model=a.model, data_path=a.data, output_dir=str(out), overwrite=True,
        batch_size=batch, micro_batch_size=a.micro_batch_size, cutoff_len=a.cutoff_len, lora_dropout=a.lora_dropout,
        max_steps=steps, max_train_samples=steps * batch, num_epochs=1,
        val_set_size=a.val_set_size, eval_steps=0, save_steps=10 ** 6, logging_steps=1,
        learning_rate=a.learning_rate, warmup_steps=max(1, a.steps // 10), seed=42,
        **VARIANTS.get(name.split(" ")[0], VARIANTS["baseline"]))
    clock = make_clock()
    load0 = os.getloadavg()[0]
    res = finetune(opts, callbacks=[clock])
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [(r["step"], r["eval/loss"]) for r in recs if "eval/loss" in r]
    train = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
    mean_train = next((r["train/mean_loss"] for r in reversed(recs) if "train/mean_loss" in r), None)
    return {
        "variant": name, "batching": res.batching, "steps": res.global_step, "train_examples": res.train_examples,
        "train_tokens": res.train_tokens, "padding_fraction": res.padding_fraction,
        "finetune_train_seconds": res.train_seconds, "finetune_tokens_per_second": res.tokens_per_second,
        "loop_wall_s": round(clock.wall, 2), "loop_cpu_s": round(clock.cpu, 2),
        "tokens_per_second": round(res.train_tokens / clock.wall, 2) if clock.wall else None,
        "tokens_per_cpu_second": round(res.train_tokens / clock.cpu, 2) if clock.cpu else None,
        "val_loss_before": evals[0][1] if evals else None, "val_loss_after": evals[-1][1] if evals else None,
        "mean_train_loss": mean_train, "train_loss_by_step": train, "fused_kernels": res.fused_kernels,
        "load_avg_1min_at_start": round(load0, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }


def write_md(path: Path, a, rows: list[dict], header: dict, done: bool) -> None:
    for r in rows:
        r["tokens_per_second"] = round(r["train_tokens"] / r["loop_wall_s"], 2)
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    lines = [
        "# LoRA fine-tuning throughput: baseline vs length grouping vs packing",
        "",
        f"- Date: {header['date']}" + ("" if done else " (**partial: run in progress**)"),
        f"- Machine: {header['machine']}",
        f"- Command: `{header['command']}`",
        f"- Model: `{a.model}` ({header['params']:,} parameters), fp32, CPU, sdpa attention; LoRA r 8 / alpha 16 "
        f"on q,k,v,o,gate,up,down, dropout {a.lora_dropout}; lr {a.learning_rate}, linear warmup "
        f"{max(1, a.steps // 10)} steps; an unmeasured {a.warmup_run_steps}-step baseline run first (warm-up)",
        f"- Data: Alpaca-cleaned, the same {a.steps * a.micro_batch_size * a.grad_accum} training examples (one pass) "
        f"for every variant; {a.steps} optimizer steps of {a.micro_batch_size * a.grad_accum} examples "
        f"(micro-batch {a.micro_batch_size} x accumulation {a.grad_accum}); cutoff_len {a.cutoff_len}; prompt "
        "tokens masked from the loss (train_on_inputs off)",
        f"- Validation: {a.val_set_size} held-out examples, padded batches in every variant; loss = mean over val "
        "batches of the per-token loss (nats/token)",
        "- tokens/s counts real (non-pad) tokens fed forward over the training loop (evaluations excluded); "
        "tokens/CPU-s divides the same tokens by this process's CPU time in the loop (less sensitive to other jobs "
        "on the shared machine)",
        f"- Fused kernels: {rows[0]['fused_kernels'] if rows else 'n/a'}",
        "",
        "| variant | padding | real tokens | loop s | tokens/s | vs baseline | tokens/CPU-s | vs baseline "
        "| mean train loss | val loss before -> after | load avg (start/end) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else "n/a"
        spc = (f"{r['tokens_per_cpu_second'] / base['tokens_per_cpu_second']:.2f}x"
               if base and r["tokens_per_cpu_second"] and base["tokens_per_cpu_second"] else "n/a")
        va = f"{r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}" if r["val_loss_after"] is not None else "n/a"
        mt = f"{r['mean_train_loss']:.4f}" if r["mean_train_loss"] is not None else "n/a"
        lines.append(
            f"| {r['variant']} | {100 * r['padding_fraction']:.1f}% | {r['train_tokens']:,} | {r['loop_wall_s']:.1f} "
            f"| {r['tokens_per_second']:.1f} | {sp} | {r['tokens_per_cpu_second']} | {spc} | {mt} | {va} "
            f"| {r['load_avg_1min_at_start']} / {r['load_avg_1min_at_end']} |")
    if base:
        lines += ["", "Per-step training loss, largest difference from the baseline (same batches for packing):", ""]
        for r in rows:
            if r is base:
                continue
            common = [s for s in base["train_loss_by_step"] if s in r["train_loss_by_step"]]
            if common:
                d = max(abs(r["train_loss_by_step"][s] - base["train_loss_by_step"][s]) for s in common)
                lines.append(f"- {r['variant']}: max |delta| = {d:.2e} over {len(common)} steps")
    if done and header.get("notes"):
        lines += ["", "## Notes", ""] + header["notes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if a.repeat_baseline:
        names.append("baseline (repeat)")
    from gqaprune.model_io import load_model

    m, _ = load_model(a.model, device="cpu", dtype="float32")
    params = sum(p.numel() for p in m.parameters())
    del m
    header = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
              "command": "python benchmarks/finetune_throughput.py " + " ".join(shlex.quote(x) for x in
                                                                            (argv if argv is not None else sys.argv[1:])),
              "params": params,
              "notes": Path(a.notes_file).read_text().splitlines() if a.notes_file else []}
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    out = Path(a.output)
    if a.warmup_run_steps:
        log(f"warm-up run ({a.warmup_run_steps} steps, not reported)")
        run_variant("warmup", a, workdir, steps=a.warmup_run_steps)
    for name in names:
        log(f"variant {name}: {a.steps} steps")
        rows.append(run_variant(name, a, workdir))
        r = rows[-1]
        log(f"  {r['tokens_per_second']:.1f} tokens/s, {r['tokens_per_cpu_second']} tokens/CPU-s, padding "
            f"{100 * r['padding_fraction']:.1f}%, val loss {r['val_loss_after']}")
        (workdir / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
        write_md(out, a, rows, header, done=False)
    write_md(out, a, rows, header, done=True)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
