#!/usr/bin/env python
"""Equivalence figures for every supported family, on the tiny random models the tests build
(tests/helpers.py ``FAMILY_CONFIGS``: 3 layers, or 6 for Gemma-3; hidden 64; fp32, CPU):

* identity: max |Δlogit| between the model and the model cut to a plan that keeps every unit;
* zeroed vs pruned: the dense model with chosen KV groups and MLP channels zeroed (their o_proj /
  down_proj input columns) against the model with exactly those units pruned, uniform and per-layer;
* reload: the saved pruned checkpoint reloaded in a fresh process that never imports gqaprune
  (stock class for uniform, ``trust_remote_code`` for per-layer) against the in-memory model;
* llama.cpp: the checkpoint exported to GGUF (f32) and run in llama.cpp (llama-cpp-python), when
  installed; the GGUF arch written is named.

    python benchmarks/families.py [--out benchmarks/results/families]

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, log, run_meta, write_markdown  # noqa: E402  (benchmarks/ is on sys.path)

sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "families")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/families")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from gqaprune.export.gguf import ARCHS
    from gqaprune.models.family import FAMILIES
    from gqaprune.models.io import save_checkpoint
    from gqaprune.models.layout import model_layout
    from gqaprune.prune.surgery import apply_plan
    from helpers import FAMILY_CONFIGS, make_family_model, make_tokenizer
    from test_families import _RELOAD, CUTS, IDS, logits, plan_removing, zero_units

    try:
        from gqaprune.bench import llamacpp
        import llama_cpp  # noqa: F401
    except ImportError:
        llamacpp = None
    rows, folders = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="gqaprune-families-"))
    for family in FAMILY_CONFIGS:
        # Mistral's sliding window is not written to GGUF (llama.cpp's llama arch has none; the export warns):
        # as in the tests, a window longer than the 24 tokens scored, so that llama.cpp's figure measures the export
        model = make_family_model(family, **({"sliding_window": 64} if family == "mistral" else {}))
        lay = model_layout(model)
        ident = apply_plan(copy.deepcopy(model), plan_removing(lay, {}, {}, "uniform"))
        row = {"family": FAMILIES[family].label, "model_type": family, "layers": lay.num_layers,
               "identity": float((logits(ident) - logits(model)).abs().max())}
        for kind, (kv_rm, ch_rm) in CUTS.items():
            zeroed = copy.deepcopy(model)
            zero_units(zeroed, kv_rm, ch_rm)
            pruned = apply_plan(copy.deepcopy(model), plan_removing(lay, kv_rm, ch_rm, kind))
            row[f"zeroed_{kind}"] = float((logits(pruned) - logits(zeroed)).abs().max())
            row[f"class_{kind}"] = type(pruned.config).__name__
            # a folder name without the family's (as in the tests): llama.cpp's vocabulary loader looks for Phi-3's
            # special tokens by name when general.name mentions phi3, and the tiny tokenizer has none
            folder = save_checkpoint(pruned, make_tokenizer(), tmp / family / f"m-{kind}")
            folders[(family, kind)] = (str(folder), pruned)
            spec = ARCHS[family]
            arch = spec.uniform if kind == "uniform" else spec.per_layer
            if llamacpp is not None and arch is not None:
                from gqaprune.cli import main as cli

                out = tmp / f"{family}-{kind}.gguf"
                if cli(["export", str(folder), "--output", str(out), "--outtype", "f32"]) == 0:
                    llm = llamacpp.load(out, n_ctx=64)
                    got = llamacpp.logits(llm, IDS[0].tolist())
                    llm.close()
                    row[f"llamacpp_{kind}"] = float(abs(got - logits(pruned)[0].numpy()).max())
            row[f"gguf_arch_{kind}"] = arch or "refused"
        rows.append(row)
        log(f"{family}: {row}")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps([v[0] for v in folders.values()]),
                           json.dumps(IDS.tolist())], capture_output=True, text=True, env=env, cwd=tmp)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    reloaded = json.loads(proc.stdout)
    for row in rows:
        for kind in CUTS:
            folder, pruned = folders[(row["model_type"], kind)]
            row[f"reload_{kind}"] = float((torch.tensor(reloaded[folder]["logits"]) - logits(pruned)).abs().max())
    data = {**run_meta(), "rows": rows}
    out = Path(a.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    m = data["machine"]
    lines = ["# Every family: equivalence figures on tiny random models", "",
             f"- date: {data['date']}; command: `{data['command']}` (git {m['git']})",
             f"- machine: {m['cpu']}, {m['cores_visible']} cores, torch {m['torch']}, transformers {m['transformers']}, "
             "fp32 on CPU", "- models: tests/helpers.py `FAMILY_CONFIGS` (hidden 64, 3 layers, 6 for Gemma-3), "
             "perturbed norms and biases; 2 x 24 random token ids (longer than the 8-token sliding windows of Gemma-2 "
             "and -3; Mistral's is set to 64, since its GGUF has no sliding window: the export warns)",
             "- cuts (tests/families/test_families.py `CUTS`): uniform = KV group 1 and 3 MLP channels from every "
             "layer; per-layer = KV group 0 from layer 1 only, 1 channel from layer 0, 40 from layer 2", "",
             "Each figure is a max |Δlogit| (fp32). *class*: the config class the pruned model is rebuilt as "
             "(stock where the counts allow). *llama.cpp*: the GGUF (f32) run in llama.cpp against transformers; "
             "the arch written beside it.", "",
             "| family | identity | zeroed vs pruned, uniform | per-layer | reload, uniform | per-layer | class, "
             "uniform / per-layer | llama.cpp uniform (arch) | llama.cpp per-layer (arch) |",
             "|---|---:|---:|---:|---:|---:|---|---|---|"]

    def lc(r, k):
        v = r.get(f"llamacpp_{k}")
        return f"{v:.1e} ({r[f'gguf_arch_{k}']})" if v is not None else r[f"gguf_arch_{k}"]

    for r in rows:
        lines.append(f"| {r['family']} | {r['identity']:.1e} | {r['zeroed_uniform']:.1e} | {r['zeroed_per-layer']:.1e} "
                     f"| {r['reload_uniform']:.1e} | {r['reload_per-layer']:.1e} | {r['class_uniform']} / "
                     f"{r['class_per-layer']} | {lc(r, 'uniform')} | {lc(r, 'per-layer')} |")
    lines += ["", "Gemma's llama.cpp figures are larger because ggml's CPU GELU reads an f16 table; SiLU families "
              "match to float rounding. *refused*: llama.cpp has no per-layer arch for the family; the export says "
              "so and points to --layout uniform."]
    write_markdown(out.with_suffix(".md"), lines)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
