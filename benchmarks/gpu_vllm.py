#!/usr/bin/env python
"""vLLM serving speed of pruned checkpoints against dense, on a GPU (prepared; needs vllm installed).

    python benchmarks/gpu_vllm.py --dense DENSE_DIR --models UNIFORM_DIR,MLP_ONLY_DIR \
        [--concurrency 1,8,32] [--new-tokens 256] [--prompt-len 512] [--out benchmarks/results/gpu_vllm]

What it serves, as a user would: stock vLLM's offline engine (``vllm.LLM``) loads each folder as
it is. A uniform gqaprune checkpoint is a stock Llama/Mistral config; a ``--layout
per-layer-mlp`` checkpoint is DeciLM ``block_configs`` (``architectures: DeciLMForCausalLM``,
vLLM's ``nemotron_nas.py``), loaded with ``trust_remote_code=True`` for its config class.
``--layout per-layer`` checkpoints vary the query heads per layer, which vLLM's model cannot
express: they are refused here, as vLLM would refuse them.

For each model and concurrency C: C random prompts of ``--prompt-len`` token ids, ``--new-tokens``
generated each (``ignore_eos``, greedy), one warm-up round, then the median of ``--repeats`` rounds;
reported as output tokens/s = C x new_tokens / wall time, and as a ratio to dense at the same C.
Models run one after another in separate engines (vLLM holds one model's memory at a time).

vLLM needs CUDA and is not on this project's machines (nor on the lent GPU image): this script
is ready for a machine where ``pip install vllm`` works. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="the unpruned checkpoint folder")
    p.add_argument("--models", required=True, help="comma-separated pruned checkpoint folders")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--out", default="benchmarks/results/gpu_vllm")
    return p.parse_args(argv)


def servable(folder: Path) -> str:
    """Why vLLM can serve the folder ('' when it can), from its config alone."""
    cfg = json.loads((folder / "config.json").read_text())
    if str(cfg.get("model_type", "")).startswith("gqapruned_"):
        return ("per-layer layout: query heads differ per layer, which vLLM's per-layer model (nemotron_nas.py) "
                "cannot express; prune with --layout uniform or --layout per-layer-mlp")
    return ""


def measure(folder: str, a, concurrency: list[int]) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams

    trust = json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "nemotron-nas"
    llm = LLM(model=folder, dtype=a.dtype, trust_remote_code=trust, gpu_memory_utilization=a.gpu_memory_utilization,
              max_model_len=a.prompt_len + a.new_tokens + 16, enforce_eager=False)
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0.0, ignore_eos=True)
    vocab = llm.get_tokenizer().vocab_size
    rng = np.random.default_rng(0)
    out = {}
    for c in concurrency:
        prompts = [{"prompt_token_ids": rng.integers(3, vocab, a.prompt_len).tolist()} for _ in range(c)]
        llm.generate(prompts, params, use_tqdm=False)   # warm-up (CUDA graphs, allocator)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t)
            assert all(len(r.outputs[0].token_ids) == a.new_tokens for r in res)
        out[c] = {"output_tok_s": c * a.new_tokens / statistics.median(times), "times": times}
        print(f"{folder} C={c}: {out[c]['output_tok_s']:,.0f} output tokens/s", flush=True)
    del llm
    gc.collect()
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        import torch
        import vllm
    except ImportError as e:
        print(f"gpu_vllm.py needs vllm and a CUDA GPU ({e}); pip install vllm on a GPU machine", file=sys.stderr)
        return 2
    conc = [int(x) for x in a.concurrency.split(",")]
    folders = [a.dense] + [m for m in a.models.split(",") if m]
    rows = {}
    for f in folders:
        why = servable(Path(f))
        rows[f] = {"skipped": why} if why else measure(f, a, conc)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "vllm": vllm.__version__,
            "gpu": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv),
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeats": a.repeats, "dtype": a.dtype}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    L = [f"# vLLM output tokens/s, pruned vs dense ({meta['gpu']}, vLLM {meta['vllm']})", "",
         f"- {meta['date']}; `{meta['command']}`; prompt {a.prompt_len} tokens, {a.new_tokens} new tokens each, "
         f"greedy, median of {a.repeats} after a warm-up", "",
         "| model | " + " | ".join(f"C={c} tok/s | vs dense" for c in conc) + " |",
         "|---|" + "---:|---:|" * len(conc)]
    dense = rows[a.dense]
    for f, r in rows.items():
        if "skipped" in r:
            L.append(f"| {f} | not served: {r['skipped']} |")
            continue
        L.append(f"| {f} | " + " | ".join(f"{r[c]['output_tok_s']:,.0f} | {r[c]['output_tok_s'] / dense[c]['output_tok_s']:.2f}x"
                                         for c in conc) + " |")
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
