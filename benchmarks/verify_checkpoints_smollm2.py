#!/usr/bin/env python
"""Both layouts at 20% and 50% on SmolLM2-135M: save, reload in a fresh process, compare logits.

    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/verify_checkpoints_smollm2.py \
        [--criterion taylor] [--out benchmarks/results/checkpoints_smollm2.md]

For each layout x ratio: prune in memory, save with gqaprune, then load the folder in a
new Python process that never imports gqaprune (stock ``AutoModelForCausalLM``; the
per-layer layout with ``trust_remote_code=True``), and compare its fp32 logits with the
in-memory pruned model's on the same tokens. Also lists Q:KV per layer from the reloaded model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RELOAD = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
path, remote, ids = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, dtype=torch.float32).eval()
assert "gqaprune" not in sys.modules
with torch.no_grad():
    logits = m(input_ids=torch.tensor(ids)).logits
torch.save(logits, sys.argv[4])
layers = m.model.layers
d = m.config.head_dim
print(json.dumps({"cls": type(m).__name__,
                  "q_per_kv": [l.self_attn.q_proj.out_features // l.self_attn.k_proj.out_features for l in layers],
                  "kv": [l.self_attn.k_proj.out_features // d for l in layers],
                  "mlp": [l.mlp.gate_proj.out_features for l in layers]}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--criterion", default="taylor")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/checkpoints_smollm2.md")
    args = ap.parse_args(argv)

    from gqaprune.models.io import load_model, save_checkpoint
    from gqaprune.data.calibration import calibration_batch
    from gqaprune.prune.score import score_units
    from gqaprune.prune.budget import Budget
    from gqaprune.prune.plan import make_plan
    from gqaprune.models.layout import count_params, model_layout
    from gqaprune.prune.surgery import apply_plan

    dense, tok = load_model(args.model, dtype="fp32", device="cpu")
    layout = model_layout(dense)
    ids = None
    if args.criterion not in ("magnitude", "random"):
        ids, desc = calibration_batch(tok, "alpaca", args.num_samples, 128, 0)
    scores = score_units(dense, layout, args.criterion, ids)
    x = tok(["The capital of France is", "Grouped-query attention shares each key and value head"],
            return_tensors="pt", padding=True)["input_ids"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("uniform", "per-layer"):
            for ratio in (0.2, 0.5):
                plan = make_plan(layout, scores, Budget(ratio=ratio).resolve(layout), layout_kind=kind)
                pruned = apply_plan(copy.deepcopy(dense), plan)
                with torch.no_grad():
                    ref = pruned(input_ids=x).logits
                folder = save_checkpoint(pruned, tok, Path(tmp) / f"{kind}_{int(ratio * 100)}", plan=plan.to_dict())
                remote = kind == "per-layer"
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", RELOAD, str(folder), "1" if remote else "0",
                                      json.dumps(x.tolist()), str(Path(tmp) / "logits.pt")],
                                     capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                info = json.loads(out.stdout.strip().splitlines()[-1])
                got = torch.load(Path(tmp) / "logits.pt")
                diff = (got - ref).abs().max().item()
                rows.append({"layout": kind, "ratio": ratio, "params": count_params(pruned),
                             "reduction": 1 - count_params(pruned) / layout.total_params, "class": info["cls"],
                             "trust_remote_code": remote, "max_abs_diff": diff, "q_per_kv": sorted(set(info["q_per_kv"])),
                             "kv_range": [min(info["kv"]), max(info["kv"])], "mlp_range": [min(info["mlp"]), max(info["mlp"])],
                             "reload_s": round(time.perf_counter() - t, 1)})
                print(json.dumps(rows[-1]), flush=True)
                del pruned
    ok = all(r["max_abs_diff"] < 1e-4 and r["q_per_kv"] == [3] for r in rows)
    lines = ["# SmolLM2-135M checkpoints reload in a fresh process", "",
             f"- date: {datetime.now(timezone.utc).date()}; machine: {platform.machine()} CPU, {os.cpu_count()} cores, fp32",
             f"- command: `python benchmarks/verify_checkpoints_smollm2.py --criterion {args.criterion}`",
             f"- criterion {args.criterion}" + (f", calibration {desc}" if ids is not None else ""),
             "- the reloading process imports only transformers (never gqaprune); per-layer uses trust_remote_code=True",
             "", "| layout | target | achieved | class | max abs logit diff (fp32) | Q:KV per layer | KV heads | MLP |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['ratio']:.0%} | {r['reduction']:.2%} | {r['class']} | {r['max_abs_diff']:.2e} "
                     f"| {r['q_per_kv']} | {r['kv_range'][0]}-{r['kv_range'][1]} | {r['mlp_range'][0]}-{r['mlp_range'][1]} |")
    lines += ["", f"All within 1e-4 and Q:KV = 3 in every layer: **{'yes' if ok else 'NO'}**"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
