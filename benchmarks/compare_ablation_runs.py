#!/usr/bin/env python
"""Compare two runs of ablation_smollm2.py row by row: are the numbers the same?

    python benchmarks/compare_ablation_runs.py BEFORE.json AFTER.json [--out results/x.md]

Used to show that a refactoring changed nothing: run the ablation's stages on the commit
before (a worktree of it) and after, each with ``--out`` pointing at its own JSON, then compare.
Prints (and writes) a Markdown table: per row the configuration, both perplexities, whether they
are bit-identical, and whether the kept counts per layer are the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    ap.add_argument("--title", default="Ablation rows before and after")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (stated in the table)")
    a = ap.parse_args(argv)
    before, after = json.loads(Path(a.before).read_text()), json.loads(Path(a.after).read_text())
    old = {r["key"]: r for r in before["rows"]}
    lines = [f"# {a.title}", "",
             f"- before: `{before['meta'].get('command')}` at git {before['meta']['machine'].get('git')}, "
             f"{before['meta'].get('date')}",
             f"- after: `{after['meta'].get('command')}` at git {after['meta']['machine'].get('git')}, "
             f"{after['meta'].get('date')}",
             f"- machine: {after['meta']['machine'].get('cpu')}, {after['meta']['machine'].get('cores_visible')} cores, "
             f"torch {after['meta']['machine'].get('torch')}; protocol: WikiText-2 {after['meta']['eval']['split']}, "
             f"first {after['meta']['eval']['first_tokens']} tokens, window {after['meta']['eval']['window']}, stride "
             f"{after['meta']['eval']['stride']}",
             f"- dense PPL before {before['dense']['ppl']!r}, after {after['dense']['ppl']!r}"]
    lines += [f"- also running: {a.note}"] if a.note else []
    lines += ["",
              "| stage | ratio | criterion | layout | allocation | split | compensate | PPL before | PPL after | "
              "identical | kept counts identical |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    same = True
    for r in after["rows"]:
        x = old.get(r["key"])
        if x is None:
            continue
        ident = r["ppl"] == x["ppl"]
        counts = r["kv_per_layer"] == x["kv_per_layer"] and r["mlp_per_layer"] == x["mlp_per_layer"]
        same &= ident and counts
        lines.append(f"| {r['stage']} | {r['ratio']:.0%} | {r['criterion']} | {r['layout']} | {r['allocation']} | "
                     f"{r['split']} | {r['compensate']} | {x['ppl']:.4f} | {r['ppl']:.4f} | {'yes' if ident else 'NO'} "
                     f"| {'yes' if counts else 'NO'} |")
    lines += ["", f"Every row bit-identical: **{'yes' if same else 'NO'}**"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
