#!/usr/bin/env python
"""Where the allocation search's prune time goes, from the seconds the ablation's plans recorded.

    python benchmarks/search_time_smollm2.py [benchmarks/results/ablation_smollm2.json]

Prints, for every ablation row that ran ``--allocation search``: its prune seconds, the search's seconds
(summed over steps) and share, and the seconds per move. The README's "80-95%, 5-7 s per move" comes
from this.
"""

import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/ablation_smollm2.json"
print("| stage | ratio | steps | prune s | search s | share | s per move |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for r in json.load(open(path))["rows"]:
    if r.get("allocation") == "search" and r.get("allocation_search"):
        s = sum(a["seconds"] for a in r["allocation_search"])
        n = sum(a["evaluations"] for a in r["allocation_search"])
        print(f"| {r['stage']} | {r['ratio']:.0%} | {r['steps']} | {r['prune_s']:.0f} | {s:.0f} | "
              f"{s / r['prune_s']:.0%} | {s / n:.2f} |")
