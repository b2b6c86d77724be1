#!/usr/bin/env python
"""LoRA fine-tuning throughput on SmolLM2 (CPU): the plain baseline vs --group_by_length vs --packing.

Every variant runs ``gqaprune.recover.finetune.finetune`` in this one process, on the same
checkpoint, the same Alpaca examples (exactly one pass over ``steps x batch`` records,
so every variant trains on the same set) and the same number of optimizer steps:

* baseline: Trainer + PEFT, random batches right-padded per batch, no length grouping,
  no packing (what LLM-Pruner's post_training.py does);
* group_by_length: the Trainer's length-grouped sampler (same examples, another order);
* packing: padding-free micro-batches (one row per micro-batch, positions restart per
  example, block-diagonal causal attention); same batches as the baseline;
* both.

Each variant runs --rounds times, the order reversed every round, with torch on one
thread by default. Reported: real (non-pad) tokens per second of the training loop (wall
clock, and per CPU-second of this process: with one thread that is the work done,
whatever else runs on a shared machine),
the share of positions that were padding, and loss per token: the mean training loss
over the run and the validation loss at the end (the same held-out examples, always
padded, for every variant). Also the padding each batching leaves over a full epoch of
the whole training split (computed, no training), because a short run's few examples
cannot show length grouping at scale. Liger fused kernels are detected and reported
(they need CUDA; on CPU there are none).

Run from the repository root (about an hour on 2 shared CPU cores at the defaults):
    gqaprune prune --recipe fast --model smollm2-135m --pruning-ratio 0.5 --layout per-layer --output /tmp/smol_pl50
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

from _common import log, write_markdown  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

VARIANTS = {
    "baseline": dict(group_by_length=False, packing=False),
    "group_by_length": dict(group_by_length=True, packing=False),
    "packing": dict(group_by_length=False, packing=True),
    "group_by_length+packing": dict(group_by_length=True, packing=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint to fine-tune (default: dense SmolLM2-135M)")
    p.add_argument("--data", default="yahma/alpaca-cleaned", help="instruction data (offline via GQAPRUNE_DATA_DIR)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per variant and round")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--val-set-size", type=int, default=32, help="held-out examples for the final val loss")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="0 (default) so padded and packed runs draw no dropout masks and can be compared step by step")
    p.add_argument("--warmup-run-steps", type=int, default=2,
                   help="an unmeasured baseline run first, so the first measured variant pays no one-off costs")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every variant this many times, order reversed each round (cancels load drift)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 makes CPU time a measure of work (no OpenMP spin-waiting on a "
                        "shared machine)")
    p.add_argument("--no-padding-sim", action="store_true",
                   help="skip the full-epoch padding computation over the whole training split")
    p.add_argument("--workdir", default="/tmp/gqaprune_ft_throughput", help="run folders (adapters, metrics)")
    p.add_argument("--output", default=str(HERE / "results" / "finetune_throughput.md"))
    p.add_argument("--notes-file", help="Markdown appended under '## Notes' when the run ends")
    p.add_argument("--render-only", action="store_true",
                   help="no runs: rewrite --output from <workdir>/results.json (e.g. to add --notes-file)")
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
    return f"{cpu}, {os.cpu_count()} logical CPUs visible (shared with other jobs), torch {torch.__version__}"


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


def run_variant(name: str, a, workdir: Path, steps: int | None = None, round_: int = 0) -> dict:
    from gqaprune.recover.finetune import FinetuneOptions, finetune

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
        "variant": name, "round": round_, "batching": res.batching, "steps": res.global_step, "train_examples": res.train_examples,
        "train_tokens": res.train_tokens, "padding_fraction": res.padding_fraction,
        "finetune_train_seconds": res.train_seconds, "finetune_tokens_per_second": res.tokens_per_second,
        "loop_wall_s": round(clock.wall, 2), "loop_cpu_s": round(clock.cpu, 2),
        "tokens_per_second": round(res.train_tokens / clock.wall, 2) if clock.wall else None,
        "tokens_per_cpu_second": round(res.train_tokens / clock.cpu, 2) if clock.cpu else None,
        "val_loss_before": evals[0][1] if evals else None, "val_loss_after": evals[-1][1] if evals else None,
        "mean_train_loss": mean_train, "train_loss_by_step": train, "fused_kernels": res.fused_kernels,
        "load_avg_1min_at_start": round(load0, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }


def padding_simulation(a) -> dict:
    """Padding over one epoch of the WHOLE training split (no training): random batches vs the Trainer's
    length-grouped sampler (its mega-batches of 50 global batches). A short run's few examples cannot show
    grouping at scale: the Trainer shrinks mega-batches to a quarter of a tiny dataset."""
    import numpy as np
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from gqaprune.data.instructions import load_instruction_records
    from gqaprune.data.tokenized import split_indices, tokenize_records
    from gqaprune.models.io import load_model

    _, tok = load_model(a.model, device="cpu", dtype="float32")
    recs = load_instruction_records(a.data)
    train_idx, _ = split_indices(len(recs), a.val_set_size, 42, None)
    t0 = time.perf_counter()
    split, _ = tokenize_records(recs, train_idx, tok, cutoff_len=a.cutoff_len, train_on_inputs=False,
                                add_eos_token=False)
    lengths = np.diff(split.offsets)
    mb, batch = a.micro_batch_size, a.micro_batch_size * a.grad_accum

    def padding(order) -> float:
        real = pos = 0
        for i in range(0, len(order) - mb + 1, mb):
            ls = lengths[order[i:i + mb]]
            real += int(ls.sum())
            pos += len(ls) * int(-(-ls.max() // 8) * 8)     # PadCollator: longest, rounded up to 8
        return 1 - real / pos

    g = torch.Generator().manual_seed(42)
    rand = torch.randperm(len(lengths), generator=g).numpy()
    grouped = np.asarray(get_length_grouped_indices(lengths.tolist(), batch, generator=g))
    return {"examples": int(len(lengths)), "mean_tokens": float(lengths.mean()),
            "padding_random": round(padding(rand), 4), "padding_grouped": round(padding(grouped), 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per variant over its rounds: summed tokens / summed loop time."""
    out = {}
    for r in rows:
        v = out.setdefault(r["variant"], {"variant": r["variant"], "runs": [], "tokens": 0, "wall": 0.0, "cpu": 0.0})
        v["runs"].append(r)
        v["tokens"] += r["train_tokens"]
        v["wall"] += r["loop_wall_s"]
        v["cpu"] += r["loop_cpu_s"]
    for v in out.values():
        first = v["runs"][0]
        v["padding"] = first["padding_fraction"]
        v["tps"] = v["tokens"] / v["wall"]
        v["tpc"] = v["tokens"] / v["cpu"]
        v["ppc"] = v["tpc"] / (1 - v["padding"])     # positions (real + pad) per CPU-second
        v["tpc_runs"] = [r["train_tokens"] / r["loop_cpu_s"] for r in v["runs"]]
        v["tps_runs"] = [r["train_tokens"] / r["loop_wall_s"] for r in v["runs"]]
        # same data, seed and no dropout: every round must give the same losses
        v["round_loss_spread"] = max((abs(r["train_loss_by_step"][k] - first["train_loss_by_step"][k])
                                      for r in v["runs"] for k in first["train_loss_by_step"]
                                      if k in r["train_loss_by_step"]), default=0.0)
    return list(out.values())


def write_md(path: Path, a, rows: list[dict], header: dict, done: bool) -> None:
    agg = aggregate(rows)
    base = next((v for v in agg if v["variant"] == "baseline"), None)
    n_ex = a.steps * a.micro_batch_size * a.grad_accum
    L = [
        "# LoRA fine-tuning throughput: baseline vs length grouping vs packing",
        "",
        f"- Date: {header['date']}" + ("" if done else " (**partial: run in progress**)"),
        f"- Machine: {header['machine']}; this run: torch {a.threads} thread(s)",
        f"- Command: `{header['command']}`",
        f"- Model: `{a.model}` ({header['params']:,} parameters), fp32, CPU, sdpa attention; LoRA r 8 / alpha 16 "
        f"on q,k,v,o,gate,up,down, dropout {a.lora_dropout}; lr {a.learning_rate}, linear warmup "
        f"{max(1, a.steps // 10)} steps; an unmeasured {a.warmup_run_steps}-step baseline run first (warm-up)",
        f"- Data: Alpaca-cleaned, the same {n_ex} training examples (one pass) for every variant; {a.steps} optimizer "
        f"steps of {a.micro_batch_size * a.grad_accum} examples (micro-batch {a.micro_batch_size} x accumulation "
        f"{a.grad_accum}); cutoff_len {a.cutoff_len}; prompt tokens masked from the loss (train_on_inputs off)",
        f"- Each variant ran {a.rounds} time(s), the order reversed every round (ABCD, DCBA, ...) so that load "
        "changes on the shared machine hit every variant alike; the speeds below are summed tokens / summed loop "
        "time over its runs (per-run values in brackets)",
        "- tokens = real (non-pad) tokens fed forward in the training loop (evaluations excluded). tokens/s is wall "
        "clock and depends on what else runs on the machine; tokens/CPU-s divides by this process's CPU time in "
        "the loop (1 thread: the work done, whatever the load). positions/CPU-s counts padding too: if it is flat "
        "across variants, the speed-up is exactly the padding removed",
        f"- Loss per token: mean training loss over the run, and the validation loss (nats/token) on {a.val_set_size} "
        "held-out examples, evaluated identically (same padded batches) in every variant",
        f"- Fused kernels: {rows[0]['fused_kernels'] if rows else 'n/a'}",
        "",
        "| variant | padding | tokens/s (runs) | vs baseline | tokens/CPU-s (runs) | vs baseline | positions/CPU-s "
        "| mean train loss | val loss before -> after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in agg:
        r0 = v["runs"][0]
        sp = f"{v['tps'] / base['tps']:.2f}x" if base else "n/a"
        spc = f"{v['tpc'] / base['tpc']:.2f}x" if base else "n/a"
        va = (f"{r0['val_loss_before']:.4f} -> {r0['val_loss_after']:.4f}" if r0["val_loss_after"] is not None
              else "n/a")
        mt = f"{r0['mean_train_loss']:.4f}" if r0["mean_train_loss"] is not None else "n/a"
        runs_s = ", ".join(f"{x:.1f}" for x in v["tps_runs"])
        runs_c = ", ".join(f"{x:.1f}" for x in v["tpc_runs"])
        L.append(f"| {v['variant']} | {100 * v['padding']:.1f}% | {v['tps']:.1f} ({runs_s}) | {sp} "
                 f"| {v['tpc']:.1f} ({runs_c}) | {spc} | {v['ppc']:.1f} | {mt} | {va} |")
    if base:
        L += ["", f"Real tokens per run: {base['runs'][0]['train_tokens']:,} (every variant, every round). "
              "Per-step training loss, largest difference from the baseline:", ""]
        for v in agg:
            if v is base:
                continue
            b, r = base["runs"][0]["train_loss_by_step"], v["runs"][0]["train_loss_by_step"]
            common = [k for k in b if k in r]
            if common:
                d = max(abs(r[k] - b[k]) for k in common)
                why = ("same batches as the baseline" if "packing" == v["variant"] else
                       "another batch order (length-grouped), so other per-step losses")
                L.append(f"- {v['variant']}: max |delta| = {d:.2e} over {len(common)} steps ({why})")
        spread = max(v["round_loss_spread"] for v in agg)
        L.append(f"- largest per-step loss difference between rounds of the same variant: {spread:.2e}")
    sim = header.get("padding_sim")
    if sim:
        pr, pg = sim["padding_random"], sim["padding_grouped"]
        L += ["", f"## Padding over a full epoch ({sim['examples']:,} training examples, mean {sim['mean_tokens']:.0f} "
              "tokens; computed, no training)", "",
              f"Micro-batches of {a.micro_batch_size}, each padded to its longest example rounded up to 8 tokens:", "",
              "| batching | padding | real-token share of positions | expected tokens/s vs baseline if positions/s "
              "is flat |", "|---|---:|---:|---:|",
              f"| random (baseline) | {100 * pr:.1f}% | {1 - pr:.3f} | 1.00x |",
              f"| length-grouped (Trainer sampler, mega-batches of 50 batches) | {100 * pg:.1f}% | {1 - pg:.3f} "
              f"| {(1 - pg) / (1 - pr):.2f}x |",
              f"| packed | 0.0% | 1.000 | {1 / (1 - pr):.2f}x |"]
    write_markdown(path, L, header.get("notes") if done else None)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    if a.render_only:
        saved = json.loads((Path(a.workdir) / "results.json").read_text())
        header = saved["header"]
        header["notes"] = Path(a.notes_file).read_text().splitlines() if a.notes_file else header.get("notes", [])
        write_md(Path(a.output), a, saved["rows"], header, done=True)
        log(f"wrote {a.output} from {a.workdir}/results.json")
        return 0
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    from gqaprune.models.io import load_model

    m, _ = load_model(a.model, device="cpu", dtype="float32")
    params = sum(p.numel() for p in m.parameters())
    del m
    header = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
              "command": "python benchmarks/finetune_throughput.py " + " ".join(
                  shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
              "params": params,
              "notes": Path(a.notes_file).read_text().splitlines() if a.notes_file else []}
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(a.output)
    rows: list[dict] = []

    def save():
        (workdir / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))

    if not a.no_padding_sim:
        log("padding over a full epoch of the training split (tokenising it)")
        header["padding_sim"] = padding_simulation(a)
        log(f"  {header['padding_sim']}")
    if a.warmup_run_steps:
        log(f"warm-up run ({a.warmup_run_steps} steps, not reported)")
        run_variant("warmup", a, workdir, steps=a.warmup_run_steps)
    for rnd in range(a.rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            log(f"round {rnd + 1}/{a.rounds}, variant {name}: {a.steps} steps")
            rows.append(run_variant(name, a, workdir, round_=rnd))
            r = rows[-1]
            log(f"  {r['train_tokens'] / r['loop_wall_s']:.1f} tokens/s, {r['tokens_per_cpu_second']} tokens/CPU-s, "
                f"padding {100 * r['padding_fraction']:.1f}%, val loss {r['val_loss_after']}")
            save()
            write_md(out, a, rows, header, done=False)
    write_md(out, a, rows, header, done=True)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
