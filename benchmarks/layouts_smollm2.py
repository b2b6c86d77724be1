#!/usr/bin/env python
"""SmolLM2-135M: what hardware-aligned MLP widths cost in quality, and the three layouts side by side.

    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/layouts_smollm2.py [--ratios 0.2,0.5] \
        [--multiples 1,64,128] [--slice-tokens 32768] [--out benchmarks/results/layouts_smollm2]

Rows, each pruned here by the real CLI (``gqaprune prune``, one run at a time) from the real model:

* ``per-layer`` with ``--round-mlp-to M`` for each M of ``--multiples`` (1 = unrounded);
* ``per-layer-mlp`` (the same KV groups in every layer, MLP widths per layer in multiples of 256:
  what DeciLM's ``block_configs`` and so vLLM can serve);
* ``uniform`` (stock Llama config);

all with one recipe (``RECIPE`` below): the README's best one-shot per-layer recipe less its
allocation search, which alone takes about twenty minutes a run on two cores (the uniform layout
takes no per-layer allocation, so it runs without ``--allocation sensitivity``). The recipe was
fixed before this run; nothing here is chosen on the numbers it reports.

Perplexity (transformers, fp32): WikiText-2 test, window 128 stride 128 on two disjoint slices of
``--slice-tokens`` tokens (A = the first, B = the next), for a spread over slices, and window 2048
stride 2048 on slice A. Not the whole test split: about 13 minutes per model per window on two
cores, for eleven models. Dense is measured in the same run on the same token ids.

Resumable: finished rows in the JSON are kept, and checkpoint folders already written by an earlier
invocation are reused. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from _common import log, prune_once, run_meta, write_markdown  # noqa: E402  (benchmarks/ is on sys.path)

RECIPE = ["--criterion", "obs", "--split", "search", "--compensate", "--num-samples", "128",
          "--sensitivity-samples", "4"]
PER_LAYER_ALLOC = ["--allocation", "sensitivity"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--multiples", default="1,64,128", help="--round-mlp-to values for the per-layer rows")
    p.add_argument("--slice-tokens", type=int, default=32768)
    p.add_argument("--long-window", type=int, default=2048, help="the second window, on slice A")
    p.add_argument("--work", default="prune_log/layouts_bench", help="folder for the checkpoints")
    p.add_argument("--out", default="benchmarks/results/layouts_smollm2")
    p.add_argument("--also-running", default="nothing else of ours",
                   help="what else shared the machine (stated in the table; prune times depend on it)")
    p.add_argument("--render", action="store_true", help="only re-render the Markdown from the JSON")
    return p.parse_args(argv)


def configs(a) -> list[tuple[str, list[str]]]:
    """(row name, gqaprune prune arguments) for every pruned row, in run order."""
    out = []
    for r in [float(x) for x in a.ratios.split(",")]:
        pct = f"{round(r * 100)}%"
        for m in [int(x) for x in a.multiples.split(",")]:
            out.append((f"per-layer M={m} {pct}", ["--pruning-ratio", str(r), "--layout", "per-layer",
                                                    "--round-mlp-to", str(m), *PER_LAYER_ALLOC]))
        out.append((f"per-layer-mlp {pct}", ["--pruning-ratio", str(r), "--layout", "per-layer-mlp",
                                             *PER_LAYER_ALLOC]))
        out.append((f"uniform {pct}", ["--pruning-ratio", str(r), "--layout", "uniform"]))
    return out


def folder_of(a, name: str) -> Path:
    return Path(a.work) / name.replace(" ", "_").replace("%", "").replace("=", "")


def prune_all(a, data: dict, save, measure_row) -> None:
    """Prune every row not yet in the JSON, and score each as soon as it exists (an interrupted run keeps
    every finished row with its perplexities)."""
    from gqaprune.prune.plan import PrunePlan

    rows = data.setdefault("rows", {})
    measure_row("dense", a.model)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for name, args in configs(a):
        folder = folder_of(a, name)
        if name in rows and (folder / "config.json").is_file():
            measure_row(name, rows[name]["folder"])
            continue
        cmd = [sys.executable, "-m", "gqaprune", "prune", "--model", a.model, *args, *RECIPE,
               "--output", str(folder), "--device", "cpu", "--dtype", "fp32"]
        wall = prune_once(name, cmd, folder, env)   # None: written by an earlier invocation that stopped early
        plan = PrunePlan.from_dict(json.loads((folder / "prune_plan.json").read_text()))
        prov = plan.provenance
        rows[name] = {"command": "gqaprune " + " ".join(cmd[3:]), "folder": str(folder), "prune_s": wall,
                      "params_after": prov["params_after"], "reduction": prov["reduction"],
                      "params_vs_target": prov.get("params_vs_target"), "round_mlp_to": prov.get("round_mlp_to"),
                      "kv_per_layer": plan.kept_kv, "mlp_per_layer": plan.kept_mlp}
        save()
        measure_row(name, str(folder))


def measurer(a, data: dict, save):
    """measure_row(name, ref): WikiText-2 PPL on slices A and B (window 128) and A (the long window), once."""
    from gqaprune.data.corpora import load_text_corpus
    from gqaprune.evaluate.perplexity import perplexity_of_ids, tokenize_corpus
    from gqaprune.models.io import load_model

    n = a.slice_tokens
    ppl = data.setdefault("ppl", {})
    held = {}   # the token ids, once

    def measure_row(name: str, ref: str) -> None:
        r = ppl.setdefault(name, {})
        if all(k in r for k in ("A128", "B128", "Along")):
            return
        model, tok = load_model(ref, dtype="fp32", device="cpu")
        if "ids" not in held:   # every checkpoint carries the source tokenizer: the same ids for every row
            held["ids"] = tokenize_corpus(tok, load_text_corpus("wikitext2", "test").text)
        ids = held["ids"]
        if "test_tokens" not in data or data["test_tokens"] != len(ids):
            if len(ids) < 2 * n:
                raise SystemExit(f"--slice-tokens {n}: WikiText-2 test has only {len(ids)} tokens")
            data["test_tokens"] = len(ids)
        for key, sl, win in (("A128", slice(0, n), 128), ("B128", slice(n, 2 * n), 128),
                             ("Along", slice(0, n), a.long_window)):
            if key in r:
                continue
            t = time.perf_counter()
            nll, scored = perplexity_of_ids(model, ids[sl], seq_len=win, progress=False)
            r[key] = {"ppl": math.exp(nll), "n_tokens": scored, "seconds": round(time.perf_counter() - t, 1)}
            log(f"{name}: {key} PPL {r[key]['ppl']:.2f} on {scored} tokens")
            save()
        del model

    return measure_row


def render(data: dict, path: Path) -> None:
    meta, rows, ppl = data["meta"], data.get("rows", {}), data.get("ppl", {})
    n = meta["slice_tokens"]
    L = ["# SmolLM2-135M: MLP-width rounding and the three layouts, one-shot quality", "",
         f"- date: {meta['date']}; command: `{meta['command']}`",
         f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores_visible']} cores, torch "
         f"{meta['machine']['torch']}, transformers {meta['machine']['transformers']}, fp32 on CPU; one prune or "
         f"evaluation at a time; also running: {meta.get('also_running', 'nothing else of ours')}",
         f"- every row: `gqaprune prune --model {meta['model']} ... {' '.join(RECIPE)}` (per-layer rows add "
         f"`{' '.join(PER_LAYER_ALLOC)}`); the exact command of each row is in the JSON",
         f"- perplexity: WikiText-2 test ({data.get('test_tokens', 0):,} tokens in all), transformers fp32; "
         f"A = tokens [0, {n:,}), B = [{n:,}, {2 * n:,}); window 128 stride 128 on A and B, window {meta['long_window']} "
         f"stride {meta['long_window']} on A. Not the whole test split. The same token ids for every row.", "",
         "*vs M=1*: the rounded row's PPL over the unrounded row's at the same ratio (window 128, mean of A and "
         "B). *params vs target*: parameters kept beyond the budget's count (+) because of unit granularity and "
         "rounding.", "",
         "| row | removed | params vs target | MLP widths (min-max) | KV groups (min-max) | PPL A w128 | PPL B w128 "
         f"| mean × dense | vs M=1 | PPL A w{meta['long_window']} | × dense | prune s |",
         "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    d = ppl.get("dense", {})

    def mean128(r):
        return (r["A128"]["ppl"] + r["B128"]["ppl"]) / 2 if "A128" in r and "B128" in r else None

    dm = mean128(d)
    if dm and "Along" in d:
        L.append(f"| dense | 0 | | | | {d['A128']['ppl']:.2f} | {d['B128']['ppl']:.2f} | 1.00 | | "
                 f"{d['Along']['ppl']:.2f} | 1.00 | |")
    for name, row in rows.items():
        r = ppl.get(name, {})
        m = mean128(r)
        base = mean128(ppl.get(name.replace(f"M={row.get('round_mlp_to') or 1}", "M=1"), {}))
        vs = f"{m / base:.3f}" if m and base and "M=" in name else ""
        pvt = row.get("params_vs_target")
        L.append(f"| {name} | {row['reduction']:.2%} | {pvt:+,} | {min(row['mlp_per_layer'])}-"
                 f"{max(row['mlp_per_layer'])} | {min(row['kv_per_layer'])}-{max(row['kv_per_layer'])} | "
                 + (f"{r['A128']['ppl']:.2f} | {r['B128']['ppl']:.2f} | {m / dm:.2f} | {vs} | " if m and dm
                    else "| | | | ")
                 + (f"{r['Along']['ppl']:.2f} | {r['Along']['ppl'] / d['Along']['ppl']:.2f} | " if "Along" in r
                    and "Along" in d else "| | ")
                 + (f"{row['prune_s']:.0f} |" if row.get("prune_s") else "|"))
    write_markdown(path, L)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(a.out).with_suffix(".json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    if a.render:
        render(data, out.with_suffix(".md"))
        return 0
    data["meta"] = run_meta(model=a.model, slice_tokens=a.slice_tokens, long_window=a.long_window,
                            also_running=a.also_running)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str))
        render(data, out.with_suffix(".md"))

    prune_all(a, data, save, measurer(a, data, save))
    save()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
