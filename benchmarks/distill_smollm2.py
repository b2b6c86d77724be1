#!/usr/bin/env python
"""Recovery of SmolLM2-135M pruned 50% (per-layer): plain LoRA vs LoRA + distillation from the dense model.

Both recoveries run ``gqaprune.recover.finetune.finetune`` with the same checkpoint, Alpaca
examples, steps, learning rate, seed and batching; the only difference is
``--distill_from smollm2-135m`` (loss = alpha * T^2 * KL(teacher || student) at
temperature T + (1 - alpha) * LM loss). Each model is then scored on WikiText-2 test
perplexity (128-token windows, first N tokens) and three zero-shot tasks
(``gqaprune.evaluate.zeroshot``, lm-eval, first --limit examples each): the pruned model
before recovery, after plain LoRA, after distillation, and (with --with-dense) the dense
teacher.

Stages write ``<workdir>/<stage>.json`` as they finish and the Markdown table is rewritten
after each one, so a long run can be polled, and a rerun skips finished stages.

Run from the repository root (about 40 minutes on 2 shared CPU cores at the defaults):
    gqaprune prune --recipe fast --model smollm2-135m --pruning-ratio 0.5 --layout per-layer --output /tmp/smol_pl50
    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/distill_smollm2.py --student /tmp/smol_pl50
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

from _common import log, write_markdown  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent

STAGES = ("lora", "lora_eval", "distill", "distill_eval", "pruned", "dense")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the pruned checkpoint (gqaprune prune --output)")
    p.add_argument("--teacher", default="smollm2-135m", help="dense model to distil from (default: the alias)")
    p.add_argument("--data", default="yahma/alpaca-cleaned")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each recovery")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="--distill_alpha")
    p.add_argument("--temperature", type=float, default=2.0, help="--distill_temperature")
    p.add_argument("--ppl-max-tokens", type=int, default=16384, help="score the first N WikiText-2 test tokens")
    p.add_argument("--tasks", default="piqa,arc_easy,boolq")
    p.add_argument("--limit", type=int, default=200, help="zero-shot examples per task")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is several times faster than 2 on a machine shared with other jobs: "
                        "no OpenMP spin-waiting)")
    p.add_argument("--with-dense", action="store_true", help="also score the dense teacher (reference row)")
    p.add_argument("--skip-pruned", action="store_true", help="do not score the pruned model before recovery")
    p.add_argument("--workdir", default="/tmp/gqaprune_distill_smollm2")
    p.add_argument("--output", default=str(HERE / "results" / "distill_smollm2.md"))
    p.add_argument("--notes-file", help="Markdown appended under '## Notes'")
    return p.parse_args(argv)


def machine() -> str:
    import torch

    from _common import cpu_name

    cpu = cpu_name()
    return (f"{cpu}, {os.cpu_count()} logical CPUs visible (shared with other jobs), torch {torch.__version__} "
            f"on {torch.get_num_threads()} thread(s)")


def score(model, tok, a) -> dict:
    """WikiText-2 PPL and zero-shot accuracy of a loaded model."""
    from gqaprune.evaluate.perplexity import perplexity
    from gqaprune.evaluate.zeroshot import zeroshot

    t0 = time.perf_counter()
    ppl = perplexity(model, tok, "wikitext2", seq_len=128, max_tokens=a.ppl_max_tokens, batch_size=8, progress=False)
    t1 = time.perf_counter()
    log(f"  {ppl.line()} ({t1 - t0:.0f} s)")
    zs = zeroshot(model, tok, a.tasks, limit=a.limit, batch_size=a.eval_batch_size)
    log("  zero-shot: " + "; ".join(f"{k} {v:.3f}" for k, v in zs.accuracies().items())
        + f" ({time.perf_counter() - t1:.0f} s)")
    return {"ppl": ppl.to_dict(), "zeroshot": zs.to_dict(), "eval_seconds": round(time.perf_counter() - t0, 1)}


def train(a, workdir: Path, distill: bool) -> dict:
    from gqaprune.recover.finetune import FinetuneOptions, finetune

    batch = a.micro_batch_size * a.grad_accum
    opts = FinetuneOptions(
        prune_model=a.student, data_path=a.data, output_dir=str(workdir / ("distill" if distill else "lora")),
        overwrite=True, batch_size=batch, micro_batch_size=a.micro_batch_size, cutoff_len=a.cutoff_len,
        max_steps=a.steps, max_train_samples=a.steps * batch, num_epochs=1, val_set_size=32, eval_steps=0,
        save_steps=10 ** 6, logging_steps=5, learning_rate=a.learning_rate, warmup_steps=max(1, a.steps // 10),
        seed=42, packing=True,
        distill_from=a.teacher if distill else None, distill_alpha=a.alpha, distill_temperature=a.temperature)
    t0 = time.perf_counter()
    res = finetune(opts)
    d = res.to_dict()
    d["run_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"  trained {res.global_step} steps, {res.train_tokens:,} tokens in {res.train_seconds:.0f} s "
        f"({res.tokens_per_second:.1f} tokens/s); val loss {res.best_eval_loss}")
    return d


def eval_adapter(a, adapter: str) -> dict:
    from peft import PeftModel

    from gqaprune.models.io import load_model

    base, tok = load_model(a.student, device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    return score(model, tok, a)


def stage(name: str, a, workdir: Path, fn) -> dict:
    f = workdir / f"{name}.json"
    if f.is_file():
        log(f"stage {name}: done earlier ({f})")
        return json.loads(f.read_text())
    log(f"stage {name}")
    out = fn()
    f.write_text(json.dumps(out, indent=2))
    gc.collect()
    return out


def _student_desc(student: str) -> str:
    """How the student was pruned, from the prune_plan.json its checkpoint carries."""
    try:
        d = json.loads((Path(student) / "prune_plan.json").read_text())
    except (OSError, ValueError):
        return "pruned checkpoint without a prune_plan.json"
    p = d.get("provenance", d)
    return (f"{p.get('source_model')} pruned {p.get('reduction', 0):.1%} of total parameters, "
            f"{d.get('layout_kind', d.get('layout', '?'))} layout, criterion {p.get('criterion')}, calibration "
            f"{p.get('calibration', '?').split(' (')[0].split('/')[-1]} {p.get('calibration_tokens', 0):,} tokens")


def write_md(path: Path, a, header: dict, res: dict, done: bool) -> None:
    tasks = [t.strip() for t in a.tasks.split(",")]
    L = [
        "# Recovery of SmolLM2-135M pruned 50%: plain LoRA vs distillation from the dense model",
        "",
        f"- Date: {header['date']}" + ("" if done else " (**partial: run in progress**)"),
        f"- Machine: {header['machine']}",
        f"- Command: `{header['command']}`",
        f"- Student: `{a.student}` ({header['student_params']:,} parameters; {_student_desc(a.student)}); "
        f"teacher: `{a.teacher}` "
        f"({header['teacher_params']:,} parameters); fp32, CPU",
        f"- Recovery (both rows): LoRA r 8 / alpha 16 on q,k,v,o,gate,up,down, {a.steps} optimizer steps of "
        f"{a.micro_batch_size * a.grad_accum} Alpaca-cleaned examples (one pass over the same "
        f"{a.steps * a.micro_batch_size * a.grad_accum} examples), cutoff_len {a.cutoff_len}, lr {a.learning_rate}, "
        f"linear warmup {max(1, a.steps // 10)} steps, seed 42, packed micro-batches",
        f"- Distillation: loss = alpha * T^2 * KL(teacher || student, softmax at temperature T) + (1 - alpha) * LM "
        f"loss over the same response tokens, alpha {a.alpha}, T {a.temperature} (Hinton's T^2 scaling); teacher "
        "run per micro-batch without gradients, in fp32 like the student",
        f"- Perplexity: WikiText-2 raw test, window 128, stride 128, the first {a.ppl_max_tokens:,} tokens of the "
        "split (the same tokens for every row)",
        f"- Zero-shot: lm-eval {header.get('lm_eval', '?')}, 0-shot, the first {a.limit} examples of each task "
        "from the local validation files (ARC-Easy: validation split, not the test split papers report); acc "
        "(acc_norm in brackets where the task defines it)",
        "",
        "| model | train s | tokens/s | final val loss | WikiText-2 PPL | " + " | ".join(tasks) + " | mean acc |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|",
    ]
    rows = [("dense teacher", None, res.get("dense")), ("pruned 50%, no recovery", None, res.get("pruned")),
            ("pruned + LoRA", res.get("lora"), res.get("lora_eval")),
            ("pruned + LoRA + distillation", res.get("distill"), res.get("distill_eval"))]
    for label, tr, ev in rows:
        if tr is None and ev is None:
            continue
        cells = [label]
        cells += ([f"{tr['train_seconds']:.0f}", f"{tr['tokens_per_second']:.1f}",
                   f"{tr['best_eval_loss']:.4f}" if tr.get("best_eval_loss") is not None else "n/a"]
                  if tr else ["-", "-", "-"])
        if ev:
            cells.append(f"{ev['ppl']['ppl']:.2f}")
            zt = ev["zeroshot"]["tasks"]
            for t in tasks:
                r = zt.get(t)
                cells.append("n/a" if r is None else f"{r['acc']:.3f}" + (f" ({r['acc_norm']:.3f})"
                                                                         if r.get("acc_norm") is not None else ""))
            cells.append(f"{ev['zeroshot']['mean_acc']:.3f}")
        else:
            cells += ["(pending)"] * (len(tasks) + 2)
        L.append("| " + " | ".join(cells) + " |")
    ev = next((res[k] for k in ("pruned", "lora_eval", "distill_eval", "dense") if res.get(k)), None)
    if ev:
        n = {t: r["n"] for t, r in ev["zeroshot"]["tasks"].items()}
        se = {t: r.get("acc_stderr") for t, r in ev["zeroshot"]["tasks"].items()}
        L += ["", "Examples scored per task: " + ", ".join(f"{t} {n[t]}" for t in n)
              + "; standard error of acc at these sizes is about " + ", ".join(
                  f"{t} {se[t]:.3f}" for t in se if se[t] is not None) + " (first scored row)."]
        L.append(f"PPL tokens scored: {ev['ppl']['n_tokens']:,}.")
    for key, label in (("lora", "plain LoRA"), ("distill", "distillation")):
        tr = res.get(key)
        if tr:
            L.append(f"- {label}: {tr['global_step']} steps, {tr['train_tokens']:,} real tokens, train loop "
                     f"{tr['train_seconds']:.0f} s, final train loss {tr['final_train_loss']}"
                     + (f", last logged KL {tr['distill']['last_kl']:.4f} / LM loss {tr['distill']['last_ce']:.4f} "
                        "per token" if tr.get("distill") and tr["distill"].get("last_kl") is not None else ""))
    write_markdown(path, L, header.get("notes") if done else None)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import lm_eval
    import torch

    torch.set_num_threads(a.threads)

    from gqaprune.models.io import load_model

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    hdr_f = workdir / "header.json"
    if hdr_f.is_file():
        header = json.loads(hdr_f.read_text())
    else:
        sm, _ = load_model(a.student, device="cpu", dtype="float32")
        tm, _ = load_model(a.teacher, device="cpu", dtype="float32", with_tokenizer=False)
        header = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
                  "command": "python benchmarks/distill_smollm2.py " + " ".join(
                      shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
                  "student_params": sum(p.numel() for p in sm.parameters()),
                  "teacher_params": sum(p.numel() for p in tm.parameters()),
                  "lm_eval": getattr(lm_eval, "__version__", "?")}
        del sm, tm
        hdr_f.write_text(json.dumps(header, indent=2))
    if a.notes_file:
        header["notes"] = Path(a.notes_file).read_text().splitlines()
    out = Path(a.output)
    res: dict = {}

    def load_and_score(ref):
        def fn():
            m, tok = load_model(ref, device="cpu", dtype="float32")
            return score(m, tok, a)
        return fn

    # the comparison first; the reference rows after it
    plan = [("lora", lambda: train(a, workdir, distill=False)),
            ("lora_eval", lambda: eval_adapter(a, str(workdir / "lora"))),
            ("distill", lambda: train(a, workdir, distill=True)),
            ("distill_eval", lambda: eval_adapter(a, str(workdir / "distill")))]
    if not a.skip_pruned:
        plan.append(("pruned", load_and_score(a.student)))
    if a.with_dense:
        plan.append(("dense", load_and_score(a.teacher)))
    for name, fn in plan:
        res[name] = stage(name, a, workdir, fn)
        write_md(out, a, header, res, done=False)
    write_md(out, a, header, res, done=True)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
