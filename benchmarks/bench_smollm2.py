#!/usr/bin/env python
"""Inference speed of SmolLM2-135M, dense vs pruned (uniform / per-layer, 20% / 50%, MLP rounding), on CPU.

    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/bench_smollm2.py \
        [--prompt-len 512 --new-tokens 128 --batch-sizes 1,16 --repeats 5] [--out benchmarks/results/bench_smollm2]

Pruned variants are made in this run from the real model with the magnitude criterion (speed
does not depend on which units are kept, only on how many). Everything is measured by
``gqaprune.bench`` in one process, models taking turns, so machine load hits them alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

CONFIGS = [("uniform 20%", "uniform", 0.2, None), ("uniform 20% mlp%64", "uniform", 0.2, 64),
           ("uniform 50%", "uniform", 0.5, None),
           ("uniform 50% mlp%64", "uniform", 0.5, 64), ("per-layer 20%", "per-layer", 0.2, None),
           ("per-layer 50%", "per-layer", 0.5, None)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS), help="subset of the configs, by name")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/bench_smollm2")
    args = ap.parse_args(argv)

    from gqaprune.bench.command import BenchOptions, bench_models
    from gqaprune.models.io import load_model
    from gqaprune.prune.score import score_units
    from gqaprune.prune.budget import Budget
    from gqaprune.prune.plan import make_plan
    from gqaprune.models.layout import model_layout
    from gqaprune.prune.surgery import apply_plan

    dense, _ = load_model(args.model, dtype="fp32", device="cpu", with_tokenizer=False)
    layout = model_layout(dense)
    scores = score_units(dense, layout, "magnitude", None)
    wanted = set(args.configs.split(","))
    named = [("dense", dense)]
    for name, kind, ratio, round_to in CONFIGS:
        if name in wanted:
            plan = make_plan(layout, scores, Budget(ratio=ratio).resolve(layout), layout_kind=kind, round_mlp_to=round_to)
            named.append((name, apply_plan(copy.deepcopy(dense), plan)))
    opts = BenchOptions(models=[n for n, _ in named], prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], repeats=args.repeats,
                        threads=args.threads)
    res = bench_models(named, opts)
    res.meta["command"] = "python benchmarks/bench_smollm2.py " + " ".join(argv if argv is not None else sys.argv[1:])
    jpath, mpath = res.save(args.out)
    text = mpath.read_text()
    from _common import cpu_name

    machine = (f"Machine: {cpu_name()}, {os.cpu_count()} cores; load average at the end "
               f"{[round(x, 2) for x in os.getloadavg()]}. Models take turns in one process, so load hits them alike.")
    mpath.write_text(f"# SmolLM2-135M inference speed, dense vs pruned (CPU)\n\nCommand: `{res.meta['command']}`\n\n"
                     f"{machine}\n\n" + text)
    print(mpath.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
