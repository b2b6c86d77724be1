#!/usr/bin/env python
"""Where the allocation search's prune time goes, from the seconds the plans recorded.

    python benchmarks/search_time_smollm2.py [benchmarks/results/ablation_smollm2.json]
    python benchmarks/search_time_smollm2.py DIR [DIR ...]     (checkpoint folders of gqaprune prune)

Prints, for every ablation row (or checkpoint) that ran ``--allocation search``: its prune seconds, the
search's seconds (summed over steps) and share, and the seconds per move. The README's "80-95%, 5-7 s per
move" comes from the ablation file; its "124 s -> 89 s" for the searches' cheaper KL from two folders of
`gqaprune prune --model smollm2-135m --pruning-ratio 0.2 --seed 0 --device cpu --dtype fp32 --output DIR`,
one pruned at git dba787f and one at ab4df1d, each alone.
"""

import json
import sys
from pathlib import Path


def rows(args):
    """(label, prune s, [allocation-search reports]) per ablation row or checkpoint folder."""
    if all(Path(a).is_dir() for a in args) and args:
        for a in args:
            prov = json.loads((Path(a) / "prune_plan.json").read_text())["provenance"]
            yield a, prov["wall_s"], prov.get("allocation_search") or []
        return
    path = args[0] if args else "benchmarks/results/ablation_smollm2.json"
    for r in json.load(open(path))["rows"]:
        if r.get("allocation") == "search":
            yield f"stage {r['stage']}, {r['ratio']:.0%}, {r['steps']} step(s)", r["prune_s"], r.get("allocation_search") or []


print("| row | prune s | search s | share | moves | s per move |")
print("|---|---:|---:|---:|---:|---:|")
for label, prune_s, reps in rows(sys.argv[1:]):
    if reps:
        s = sum(a["seconds"] for a in reps)
        n = sum(a["evaluations"] for a in reps)
        print(f"| {label} | {prune_s:.0f} | {s:.0f} | {s / prune_s:.0%} | {n} | {s / n:.2f} |")
