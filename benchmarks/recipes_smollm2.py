#!/usr/bin/env python
"""SmolLM2-135M: the ``--recipe`` presets under the honest protocol (issue 14, section 1).

    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/recipes_smollm2.py \
        [--rows dense,balanced:0.2:0,fast:0.2:0,...] [--out benchmarks/results/recipes_smollm2]

Each row is ``recipe:ratio:seed`` (seed = the calibration sample's seed), pruned here by the real CLI
(``gqaprune prune --recipe R --pruning-ratio r --seed s``, one run at a time, fp32 on CPU); *prune s*
is that whole command's wall time (load, calibration, scoring, search, refit, save).

Measured for every row, with the same token ids for every row:

* **validation** (for choosing): the first ``--val-tokens`` tokens of ``alpaca-heldout``, the Alpaca-cleaned
  records that calibration and fine-tuning never draw (``gqaprune.data.instructions.HELD_OUT_EVERY``),
  in the fine-tuning template; window 128, stride 128.
* **report**: the *whole* WikiText-2 test split, window 128 stride 128 and window 2048 stride 2048, scored
  as two halves A and B split at a multiple of 2048 tokens. Each window lies in one half, so the
  whole-split PPL is exactly exp of the token-weighted mean NLL of A and B (the same windows a single
  pass scores); the halves give a spread over slices, the seeds a spread over calibration samples.

Nothing is chosen on the WikiText-2 columns: each recipe's settings were fixed, on the validation column,
before its WikiText-2 columns were measured; a candidate change is a row ``recipe:ratio:seed:TAG``
(``CANDIDATES``) compared with the recipe on validation only.

Resumable: every measurement is saved to OUT.json as it finishes, and checkpoint folders already written
are reused. ``summary`` in the JSON (per recipe and ratio, the mean over seeds) is what
``gqaprune prune`` prints after a run with that recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from gqaprune.models.io import read_prune_plan
from _common import KEYS, Measurer, prune_once, run_meta, whole, write_markdown  # noqa: E402  (benchmarks/ is on sys.path)

DEFAULT_ROWS = ("dense,balanced:0.2:0,fast:0.2:0,balanced:0.2:1,balanced:0.5:0,balanced:0.5:1,fast:0.2:1,"
                "fast:0.5:0,best:0.2:0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="dense and recipe:ratio:seed[:TAG] (TAG: a candidate of CANDIDATES), comma-separated, run in order")
    p.add_argument("--val-tokens", type=int, default=32768)
    p.add_argument("--work", default="prune_log/recipes_bench", help="folder for the checkpoints")
    p.add_argument("--out", default="benchmarks/results/recipes_smollm2")
    p.add_argument("--also-running", default="nothing else of ours",
                   help="what else shared the machine (stated in the table; prune times depend on it)")
    p.add_argument("--keys", default=",".join(KEYS), help="which measurements to make (a subset of "
                   f"{','.join(KEYS)}; the rest of a row stays empty)")
    p.add_argument("--render", action="store_true", help="only re-render the Markdown from the JSON")
    p.add_argument("--merge", default=None, metavar="FILE[,FILE]",
                   help="fold the results JSON of invocations that ran beside this one (their own --out) into "
                        "OUT.json, then re-render; nothing is measured")
    return p.parse_args(argv)


# candidate variants of a recipe, chosen between on the validation column only: ``recipe:ratio:seed:TAG``
# adds CANDIDATES[TAG]'s flags to the recipe's. ``summary`` (what gqaprune prints) groups rows by the
# recipe whose settings ran (``current_recipe``), so a candidate enters it only once a recipe adopts it.
CANDIDATES = {
    "search40": ["--allocation", "search", "--search-evaluations", "40", "--search-samples", "8"],
    "text": ["--calibration-format", "text"],
    # the search's KL on 16 samples instead of 8 (balanced's 8 overfit: -10% KL on them, -1.4% on the 8
    # held-out check samples), each move screened on the first 4 so that a rejected move costs 4 samples
    "s16screen4": ["--search-samples", "16", "--search-screen-samples", "4"],
    # 2026-12-02, after the search's KL became cheaper (layerwise.DenseTarget): spend the time saved on
    # more moves, or on more samples per move (what best does, at 150 moves on 16 samples)
    "search60": ["--search-evaluations", "60"],
    "s12": ["--search-samples", "12"],
}


def parse_row(spec: str) -> tuple[str, float, int, str | None] | None:
    if spec == "dense":
        return None
    recipe, ratio, seed, *tag = spec.split(":")
    if tag and tag[0] not in CANDIDATES:
        raise SystemExit(f"row {spec}: unknown candidate {tag[0]}; one of {', '.join(CANDIDATES)}")
    return recipe, float(ratio), int(seed), tag[0] if tag else None


def current_recipe(record: dict | None) -> str | None:
    """The recipe of today's ``RECIPES`` whose settings are exactly what a prune ran (``record``: its plan's
    ``provenance.recipe``), or None: a prune with a recipe's earlier settings, or a candidate matching none."""
    from gqaprune.prune.recipes import RECIPES

    ran = (record or {}).get("settings") or {}
    return next((n for n, r in RECIPES.items() if ran and all(ran.get(k) == v for k, v in r.items())), None)


def summary(data: dict) -> list[dict]:
    """Per recipe and ratio: mean over seeds of the whole-split x dense at both windows, and the prune time."""
    ppl, rows, meta = data.get("ppl", {}), data.get("rows", {}), data["meta"]
    d128, d2048 = whole(ppl.get("dense", {}), 128), whole(ppl.get("dense", {}), 2048)
    if not d128 or not d2048:
        return []
    groups: dict[tuple, list] = {}
    seen = set()   # (recipe, ratio, seed): a seed pruned twice with the same settings counts once
    # by the settings that ran, so a candidate equal to a recipe counts as it
    recipe_of = {name: current_recipe(row.get("recipe_record")) for name, row in rows.items()
                 if whole(ppl.get(name, {}), 128) and row.get("prune_s")}
    # A row pruned by code that has since changed what a recipe's settings do (``superseded``: why) counts
    # only where no row of today's code measures that recipe and ratio; the summary then says so.
    today = {(rc, rows[name]["ratio"]) for name, rc in recipe_of.items() if not rows[name].get("superseded")}
    earlier: dict[tuple, set] = {}
    for name in sorted(recipe_of, key=lambda n: rows[n]["seed"]):   # stable: a repeated seed's first row wins
        row, rc = rows[name], recipe_of[name]
        w128, w2048 = whole(ppl[name], 128), whole(ppl[name], 2048)
        key = (rc, row["ratio"])
        if not rc or (rc, row["ratio"], row["seed"]) in seen or (row.get("superseded") and key in today):
            continue
        seen.add((rc, row["ratio"], row["seed"]))
        if row.get("superseded"):
            earlier.setdefault(key, set()).add(row["superseded"])
        groups.setdefault(key, []).append((w128[0], w2048 and w2048[0], row["prune_s"]))
    m = meta["machine"]
    long = {k: [x[1] for x in v if x[1]] for k, v in groups.items()}   # rows measured at window 2048 too
    return [{"recipe": rc, "ratio": ratio, "seeds": len(v), "model": meta["model"],
             "x_dense_w128": statistics.mean(x[0] for x in v) / d128[0],
             "x_dense_w2048": statistics.mean(long[rc, ratio]) / d2048[0] if long[rc, ratio] else None,
             "x_dense_w128_seeds": [round(x[0] / d128[0], 4) for x in v],
             "x_dense_w2048_seeds": [round(x / d2048[0], 4) for x in long[rc, ratio]],
             "prune_s": statistics.mean(x[2] for x in v),
             "prune_s_range": [min(x[2] for x in v), max(x[2] for x in v)],   # rows ran alone or beside jobs
             "protocol": f"whole WikiText-2 test ({d128[1]:,} tokens scored at window 128), mean of {len(v)} "
                         f"calibration seed{'s' if len(v) > 1 else ''}"
                         + (f" (window 2048: {len(long[rc, ratio])} of them)"
                            if long[rc, ratio] and len(long[rc, ratio]) < len(v) else "")
                         + "".join(f"; pruned {why}" for why in sorted(earlier.get((rc, ratio), ()))),
             "machine": f"a {m['cores_visible']}-core CPU"} for (rc, ratio), v in sorted(groups.items())]


def label(row: dict) -> str:
    """The table's recipe cell: the recipe, a candidate's flags, and which of today's recipes the row is."""
    now, tag = current_recipe(row.get("recipe_record")), row.get("candidate")
    out = row["recipe"] + (f" + `{' '.join(CANDIDATES[tag])}`" if tag else "")
    if row.get("superseded"):
        out += f" (pruned {row['superseded']})"
    if now == row["recipe"] and not tag:
        return out
    if now:
        return out + f" (= today's {now})"
    return out + (" (a candidate; matches no recipe)" if tag else " (the recipe's earlier settings)")


def render(data: dict, path: Path) -> None:
    meta, rows, ppl = data["meta"], data.get("rows", {}), data.get("ppl", {})
    tk = data.get("tokens", {})
    L = ["# SmolLM2-135M: the --recipe presets, chosen on validation text, reported on the whole WikiText-2 test",
         "", f"- date: {meta['date']}; command: `{meta['command']}` (git {meta['machine'].get('git')})",
         *[f"- rows before it from an earlier invocation: {e['date']}, `{e['command']}` (git {e['git']}; also running: "
           f"{e['also_running']})" for e in data.get("earlier_runs", [])],
         f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores_visible']} cores, torch "
         f"{meta['machine']['torch']}, transformers {meta['machine']['transformers']}, fp32 on CPU; also running "
         f"(this invocation; earlier ones above and in the notes): {meta.get('also_running')}",
         "- every row: `gqaprune prune --model " + meta["model"] + " --recipe R --pruning-ratio r --seed s "
         "--device cpu --dtype fp32 --output DIR` (the recipes' flags: `src/gqaprune/prune/recipes.py`, the "
         "README's Recipes table); the exact command and the recipe record of each row are in the JSON",
         f"- **validation** (choose here): `alpaca-heldout` (Alpaca-cleaned records never used for calibration or "
         f"fine-tuning), first {tk.get('val', 0):,} tokens, window 128 stride 128",
         f"- **report**: the whole WikiText-2 test split ({tk.get('test', 0):,} tokens), window 128 stride 128 "
         "and window 2048 stride 2048, transformers fp32; A = tokens [0, "
         f"{tk.get('half', 0):,}), B = the rest; *whole* = exp of the token-weighted mean NLL of A and B, which "
         "is exactly the one-pass PPL of the whole split (no window straddles the cut)",
         "- *seed* is the calibration sample's seed (the spread over calibration samples); *A / B* are the two "
         "halves' PPLs (the spread over slices)", "",
         "| row | recipe | ratio | seed | removed | val PPL | × dense | w128 whole | × dense | A / B w128 "
         "| w2048 whole | × dense | A / B w2048 | prune s |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    d = ppl.get("dense", {})
    dv, d128, d2048 = d.get("val", {}).get("ppl"), whole(d, 128), whole(d, 2048)

    def cells(r, dense_val):
        out = []
        v = r.get("val", {}).get("ppl")
        out += [f"{v:.2f}" if v else "", f"{v / dense_val:.2f}" if v and dense_val else ""]
        for win, dw in ((128, d128), (2048, d2048)):
            w = whole(r, win)
            out += [f"{w[0]:.2f}" if w else "", f"{w[0] / dw[0]:.2f}" if w and dw else "",
                    f"{r[f'A{win}']['ppl']:.2f} / {r[f'B{win}']['ppl']:.2f}" if w else ""]
        return out

    L.append("| dense | | | | 0 | " + " | ".join(cells(d, dv)) + " | |")
    for name, row in rows.items():
        L.append(f"| {name} | {label(row)} | {row['ratio']:.0%} | {row['seed']} | {row['reduction']:.2%} | "
                 + " | ".join(cells(ppl.get(name, {}), dv)) + f" | {row.get('prune_s') or 0:.0f} |")
    s = summary(data)
    if s:
        L += ["", "Per recipe (mean over seeds; what `gqaprune prune` prints after a run with that recipe):", "",
              "| recipe | ratio | seeds | × dense w128 (whole test) | per seed | × dense w2048 (whole test) | per seed "
              "| prune s (range over the rows; see their notes) |", "|---|---:|---:|---:|---|---:|---|---:|"]
        L += [f"| {x['recipe']} | {x['ratio']:.0%} | {x['seeds']} | {x['x_dense_w128']:.2f} | "
              f"{' / '.join(f'{y:.2f}' for y in x['x_dense_w128_seeds'])} | "
              f"{'' if x['x_dense_w2048'] is None else format(x['x_dense_w2048'], '.2f')} | "
              f"{' / '.join(f'{y:.2f}' for y in x['x_dense_w2048_seeds'])} | "
              f"{'-'.join(f'{y:.0f}' for y in sorted(set(x['prune_s_range'])))} |" for x in s]
    write_markdown(path, L, data.get("notes"))


def run_of(meta: dict) -> dict:
    """An invocation as ``earlier_runs`` lists it, from its ``meta``."""
    return {k: meta[k] for k in ("date", "command", "also_running")} | {"git": meta["machine"].get("git")}


def merge(data: dict, other: dict, source: str) -> None:
    """Fold ``other`` (the results of an invocation that ran beside this file's, with its own ``--out``) into
    ``data``: its rows and measurements are copied unchanged, its invocations join ``earlier_runs``. Refuses
    a row or measurement both hold with different contents, and token ids counted differently."""
    for k, n in other.get("tokens", {}).items():
        if data.setdefault("tokens", {}).setdefault(k, n) != n:
            raise SystemExit(f"--merge {source}: its {k} token count {n} differs from {data['tokens'][k]}; "
                             "the two were measured on different text")
    for name, row in other.get("rows", {}).items():
        if data.setdefault("rows", {}).setdefault(name, row) != row:
            raise SystemExit(f"--merge {source}: row {name!r} is in both files with different contents; rename "
                             "one of them first")
    for name, keys in other.get("ppl", {}).items():
        mine = data.setdefault("ppl", {}).setdefault(name, {})
        for k, v in keys.items():
            if mine.setdefault(k, v) != v:
                raise SystemExit(f"--merge {source}: {name} {k} is measured in both files with different "
                                 "results; keep one by hand")
    runs = data.setdefault("earlier_runs", [])
    for e in other.get("earlier_runs", []) + [run_of(other["meta"])]:
        if e not in runs and e != run_of(data["meta"]):   # a side file started from a copy of this one holds its run
            runs.append(e)
    notes = data.setdefault("notes", [])
    notes += [n for n in other.get("notes", []) if n not in notes]


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(a.out).with_suffix(".json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    for src in (a.merge or "").split(","):
        if src:
            merge(data, json.loads(Path(src).read_text()), src)
    if a.render or a.merge:   # the summary (which gqaprune prune reads) and the Markdown, from the rows as they are
        data["summary"] = summary(data)
        out.write_text(json.dumps(data, indent=1))
        render(data, out.with_suffix(".md"))
        return 0
    if "meta" in data:   # resuming: keep what the earlier invocations were
        data.setdefault("earlier_runs", []).append(run_of(data["meta"]))
    data["meta"] = run_meta(model=a.model, also_running=a.also_running)
    rows = data.setdefault("rows", {})

    def save():
        data["summary"] = summary(data)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)
        render(data, out.with_suffix(".md"))

    measure = Measurer(a.val_tokens, a.keys.split(","), data, save)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for spec in a.rows.split(","):
        row = parse_row(spec)
        if row is None:
            measure("dense", a.model)
            continue
        recipe, ratio, seed, tag = row
        name = f"{recipe}{'+' + tag if tag else ''} {ratio:.0%} s{seed}"
        folder = Path(a.work) / f"{recipe}{'_' + tag if tag else ''}_{int(ratio * 100)}_s{seed}"
        cmd = [sys.executable, "-m", "gqaprune", "prune", "--model", a.model, "--recipe", recipe, "--pruning-ratio",
               str(ratio), "--seed", str(seed), "--device", "cpu", "--dtype", "fp32", "--output", str(folder),
               *CANDIDATES.get(tag, [])]
        if name not in rows:
            earlier = read_prune_plan(folder)   # a folder an earlier invocation wrote is reused, if it is this recipe
            if not tag and earlier and current_recipe(earlier["provenance"].get("recipe")) != recipe:
                raise SystemExit(f"{folder} holds a prune with other settings than today's recipe {recipe} (an "
                                 "earlier version of it?); pass --work with a new folder")
            wall = prune_once(name, cmd, folder, env)
            prov = read_prune_plan(folder)["provenance"]
            rows[name] = {"recipe": recipe, "ratio": ratio, "seed": seed, "folder": str(folder), "prune_s": wall,
                          "command": "gqaprune " + " ".join(cmd[3:]), "reduction": prov["reduction"],
                          "recipe_record": prov.get("recipe"), "candidate": tag}
            save()
        measure(name, rows[name]["folder"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
