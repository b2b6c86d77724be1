#!/usr/bin/env python
"""SmolLM2-135M in llama.cpp: pruned GGUFs' perplexity beside transformers', and their speed, at f16 / Q8_0 / Q4_K_M.

    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/llamacpp_smollm2.py [--threads 2] \
        [--ppl-tokens 32768] [--out benchmarks/results/llamacpp_smollm2]

Models: dense, uniform 20% / 50%, per-layer 20% / 50%, and the largest reduction gqaprune allows
on SmolLM2 (every layer keeps one KV group and one MLP channel), plus uniform and per-layer 20% / 50%
with MLP widths rounded to multiples of 256 (speed only), all pruned in this run from the
real model (taylor, 32 x 128 Alpaca calibration tokens; speed depends on the shapes, not on which
units are kept), saved as checkpoints, exported with ``gqaprune export`` at f16, and quantized
with llama.cpp's quantizer to Q8_0 and Q4_K_M.

* Perplexity: WikiText-2 test, the first ``--ppl-tokens`` tokens, 128-token windows, stride 128,
  the same token ids for every model (the checkpoint's tokenizer). ``gqaprune eval`` protocol in
  transformers (fp32) beside llama.cpp's own logits on the same windows (f32 KV cache).
* Speed (llama.cpp, batch 1, ``--threads`` fixed): prefill of a 512-token prompt and 128 greedy
  decode steps, one warm-up then the median of 5 runs, models taking turns per repeat. Beside each
  speedup: the FLOPs ratio (prefill's ideal) and the weight-bytes ratio (decode is memory-bound,
  so the bytes it streams per token bound its speedup).

Resumable: finished rows in the JSON are kept. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from _common import log, run_meta, write_markdown  # noqa: E402  (benchmarks/ is on sys.path as a script)

# (name, layout, ratio, --round-mlp-to): the rounded rows measure speed only (their quality cost is measured in
# transformers by benchmarks/layouts_smollm2.py); 256 is the K-quants' block (Q4_K_M / Q5_K_M super-blocks)
CONFIGS = [("dense", None, None, None), ("uniform 20%", "uniform", 0.2, None), ("uniform 50%", "uniform", 0.5, None),
           ("per-layer 20%", "per-layer", 0.2, None), ("per-layer 50%", "per-layer", 0.5, None),
           ("max uniform", "uniform", "max", None),
           ("uniform 20% M=256", "uniform", 0.2, 256), ("uniform 50% M=256", "uniform", 0.5, 256),
           ("per-layer 20% M=256", "per-layer", 0.2, 256), ("per-layer 50% M=256", "per-layer", 0.5, 256)]
SPEED_ONLY = {name for name, *_, m in CONFIGS if m}
TYPES = ("f16", "Q8_0", "Q4_K_M")
GOALS = {"decode": 0.85, "prefill": 0.9}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (fixed, stated)")
    p.add_argument("--ppl-tokens", type=int, default=32768, help="first N WikiText-2 test tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--work", default="prune_log/llamacpp_bench", help="folder for the checkpoints and GGUFs")
    p.add_argument("--out", default="benchmarks/results/llamacpp_smollm2")
    p.add_argument("--render", action="store_true", help="only re-render the Markdown from the JSON")
    p.add_argument("--remeasure-speed", action="store_true",
                   help="measure every model's speed again in this run (kept perplexities are reused)")
    return p.parse_args(argv)


def max_ratio(layout) -> float:
    """The largest fraction of parameters gqaprune can remove: one KV group and one channel left per layer."""
    most = sum((s.n_kv - 1) * layout.group_params + (s.n_mlp - 1) * layout.channel_params for s in layout.layers)
    return (most - layout.channel_params) / layout.total_params   # one channel short of the bound: solvable


def build_models(a, data: dict) -> dict:
    """name -> checkpoint folder (pruned here when missing) and its HF shape (FLOPs, params)."""
    from gqaprune.bench.flops import model_shape
    from gqaprune.data.calibration import calibration_batch
    from gqaprune.models.io import load_model, save_checkpoint
    from gqaprune.models.layout import model_layout
    from gqaprune.prune.budget import Budget
    from gqaprune.prune.plan import make_plan
    from gqaprune.prune.score import score_units
    from gqaprune.prune.surgery import apply_plan

    work = Path(a.work)
    dense, tok = load_model(a.model, dtype="fp32", device="cpu")
    layout = model_layout(dense)
    ids, desc = calibration_batch(tok, "alpaca", 32, 128, 0)
    scores = score_units(dense, layout, "taylor", ids, progress=False)
    out = {}
    for name, kind, ratio, multiple in CONFIGS:
        folder = work / name.replace(" ", "_").replace("%", "").replace("=", "")
        model = dense
        if kind is not None:
            r = max_ratio(layout) if ratio == "max" else ratio
            plan = make_plan(layout, scores, Budget(ratio=r).resolve(layout), layout_kind=kind, round_mlp_to=multiple,
                             provenance={"source_model": a.model, "criterion": "taylor", "calibration": desc})
            model = apply_plan(copy.deepcopy(dense), plan)
        if not (folder / "config.json").is_file():
            save_checkpoint(model, tok, folder, overwrite=True, kind="benchmark")
        sh = model_shape(model)
        out[name] = {"folder": str(folder), "params": sh.params, "flops_prefill": sh.flops_per_token(
            "prefill", a.prompt_len, a.new_tokens), "flops_decode": sh.flops_per_token("decode", a.prompt_len,
                                                                                        a.new_tokens)}
        if model is not dense:
            del model
    data["calibration"] = desc
    return out


def export_all(models: dict) -> None:
    """f16 GGUF of each checkpoint, then llama.cpp's Q8_0 and Q4_K_M of it."""
    from gqaprune.export.gguf import ExportOptions, export
    from gqaprune.export.quantize import quantize

    for m in models.values():
        f16 = Path(m["folder"] + ".f16.gguf")
        if not f16.is_file():
            export(ExportOptions(checkpoint=m["folder"], output=str(f16), outtype="f16", overwrite=True))
        m["gguf"] = {"f16": str(f16)}
        for q in TYPES[1:]:
            qp = f16.with_name(f16.name.replace(".f16.gguf", f".{q}.gguf"))
            if not qp.is_file():
                quantize(f16, qp, q)
            m["gguf"][q] = str(qp)
        m["gguf_bytes"] = {t: _tensor_bytes(p) for t, p in m["gguf"].items()}


def _tensor_bytes(path) -> int:
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(str(path)).tensors))


def measure_ppl(a, models: dict, data: dict, save) -> None:
    import math

    from gqaprune.bench import llamacpp
    from gqaprune.data.corpora import load_text_corpus
    from gqaprune.evaluate.perplexity import perplexity_of_ids, tokenize_corpus
    from gqaprune.models.io import load_model

    rows = data.setdefault("ppl", {})
    for name, m in models.items():
        if name in SPEED_ONLY:
            continue
        if name in rows and all(t in rows[name] for t in ("hf",) + TYPES):
            continue
        model, tok = load_model(m["folder"], dtype="fp32", device="cpu")
        ids = tokenize_corpus(tok, load_text_corpus("wikitext2", "test").text)[: a.ppl_tokens]
        r = rows.setdefault(name, {})
        if "hf" not in r:
            t = time.perf_counter()
            nll, n = perplexity_of_ids(model, ids, seq_len=128, progress=False)
            r["hf"] = {"ppl": math.exp(nll), "n_tokens": n, "seconds": round(time.perf_counter() - t, 1)}
            log(f"{name}: transformers fp32 PPL {r['hf']['ppl']:.3f} on {n} tokens")
        del model
        for typ in TYPES:
            if typ in r:
                continue
            t = time.perf_counter()
            llm = llamacpp.load(m["gguf"][typ], n_ctx=128, threads=a.threads)
            nll, n = llamacpp.perplexity(llm, ids.tolist(), seq_len=128)
            llm.close()
            r[typ] = {"ppl": math.exp(nll), "n_tokens": n, "seconds": round(time.perf_counter() - t, 1)}
            log(f"{name}: llama.cpp {typ} PPL {r[typ]['ppl']:.3f} ({r[typ]['ppl'] / r['hf']['ppl'] - 1:+.2%})")
            save()


def measure_speed(a, models: dict, data: dict, save) -> None:
    from gqaprune.bench import llamacpp

    rows = data.setdefault("speed", {})
    for typ in TYPES:
        todo = [n for n in models if f"{n}|{typ}" not in rows]
        if not todo:
            continue
        llms = {n: llamacpp.load(models[n]["gguf"][typ], n_ctx=a.prompt_len + a.new_tokens + 8, threads=a.threads,
                                 f32_cache=False, logits_all=False) for n in todo}
        runs = {n: ([], []) for n in todo}
        for rep in range(a.repeats):   # models take turns, so a slow phase of the machine hits all alike
            for n in todo:
                s = llamacpp.speed(llms[n], prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeats=1,
                                   warmup=1 if rep == 0 else 0, seed=rep)
                runs[n][0].extend(s.prefill_times)
                runs[n][1].extend(s.decode_times)
        import statistics

        for n in todo:
            pre, dec = runs[n]
            rows[f"{n}|{typ}"] = {"prefill_tok_s": a.prompt_len / statistics.median(pre),
                                  "decode_tok_s": a.new_tokens / statistics.median(dec), "prefill_times": pre,
                                  "decode_times": dec}
            log(f"{n} {typ}: prefill {rows[f'{n}|{typ}']['prefill_tok_s']:.0f} tok/s, decode "
                f"{rows[f'{n}|{typ}']['decode_tok_s']:.1f} tok/s")
        for llm in llms.values():
            llm.close()
        save()


def render(data: dict, path: Path) -> None:
    meta, models = data["meta"], data["models"]
    dense = models["dense"]
    L = ["# SmolLM2-135M pruned, in llama.cpp: perplexity and speed", "",
         f"- date: {meta['date']}; command: `{meta['command']}`",
         f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores_visible']} cores; llama.cpp through "
         f"llama-cpp-python {meta.get('llama_cpp_python')}, {meta['threads']} threads; also running: "
         f"{meta.get('also_running', 'nothing else of ours')}",
         f"- models pruned here from `{meta['model']}`: taylor, {data.get('calibration')}; exported with "
         "`gqaprune export --outtype f16`, quantized with llama.cpp's quantizer", ""]
    if data.get("ppl"):
        first = next(iter(data["ppl"].values()))["hf"]
        L += ["## Perplexity: llama.cpp beside transformers", "",
              f"WikiText-2 test, first {meta['ppl_tokens']:,} tokens ({first['n_tokens']:,} scored), window 128, stride 128, the same token ids everywhere. transformers: the checkpoint in fp32 "
              "(`gqaprune eval` protocol); llama.cpp: its own logits on the same windows (f32 KV cache).", "",
              "| model | params | transformers fp32 | llama.cpp f16 | f16 vs fp32 | Q8_0 | Q4_K_M | Q8_0 / dense Q8_0 "
              "| Q4_K_M / dense Q4_K_M |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        dp = data["ppl"].get("dense", {})
        for name, r in data["ppl"].items():
            if not all(t in r for t in ("hf",) + TYPES):
                continue
            L.append(f"| {name} | {models[name]['params']:,} | {r['hf']['ppl']:.2f} | {r['f16']['ppl']:.2f} | "
                     f"{r['f16']['ppl'] / r['hf']['ppl'] - 1:+.2%} | {r['Q8_0']['ppl']:.2f} | {r['Q4_K_M']['ppl']:.2f} | "
                     f"{r['Q8_0']['ppl'] / dp['Q8_0']['ppl']:.2f}x | {r['Q4_K_M']['ppl'] / dp['Q4_K_M']['ppl']:.2f}x |")
        worst = max((abs(r["f16"]["ppl"] / r["hf"]["ppl"] - 1) for r in data["ppl"].values() if "f16" in r),
                    default=None)
        if worst is not None:
            L += ["", f"f16 within 1% of transformers: **{'yes' if worst <= 0.01 else 'NO'}** (largest gap "
                  f"{worst:.2%})", ""]
    if data.get("speed"):
        L += ["## Speed in llama.cpp (batch 1)", "",
              f"Prefill: one {meta['prompt_len']}-token prompt; decode: {meta['new_tokens']} greedy steps; median "
              f"of {meta['repeats']} runs after a warm-up, models taking turns. Ideal speedups: FLOPs ratio for "
              "prefill, weight-bytes ratio for decode (the bytes streamed per token).", "",
              "| model | type | prefill tok/s | speedup | ideal (FLOPs) | of ideal | decode tok/s | speedup | ideal "
              "(bytes) | of ideal |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        met = {"prefill": [], "decode": []}
        for typ in TYPES:
            base = data["speed"].get(f"dense|{typ}")
            for name in models:
                r = data["speed"].get(f"{name}|{typ}")
                if not r or not base:
                    continue
                m = models[name]
                sp, sd = r["prefill_tok_s"] / base["prefill_tok_s"], r["decode_tok_s"] / base["decode_tok_s"]
                ip = dense["flops_prefill"] / m["flops_prefill"]
                ib = dense["gguf_bytes"][typ] / m["gguf_bytes"][typ]
                L.append(f"| {name} | {typ} | {r['prefill_tok_s']:,.0f} | {sp:.2f}x | {ip:.2f}x | {sp / ip:.2f} | "
                         f"{r['decode_tok_s']:,.1f} | {sd:.2f}x | {ib:.2f}x | {sd / ib:.2f} |")
                if name != "dense":
                    met["prefill"].append((sp / ip, name, typ))
                    met["decode"].append((sd / ib, name, typ))
        L += [""]
        for phase, goal in GOALS.items():
            if met[phase]:
                worst = min(met[phase])
                ok = sum(x[0] >= goal for x in met[phase])
                L.append(f"- goal {phase} >= {goal} of its ideal: met in {ok} of {len(met[phase])} rows; lowest "
                         f"{worst[0]:.2f} ({worst[1]}, {worst[2]})")
    write_markdown(path, L)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(a.out).with_suffix(".json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    if a.render:
        render(data, out.with_suffix(".md"))
        return 0
    import llama_cpp

    data["meta"] = run_meta(model=a.model, threads=a.threads, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                            repeats=a.repeats, ppl_tokens=a.ppl_tokens, llama_cpp_python=llama_cpp.__version__)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str))
        render(data, out.with_suffix(".md"))

    if a.remeasure_speed:
        data.pop("speed", None)
    models = build_models(a, data)
    export_all(models)
    data["models"] = models
    save()
    measure_ppl(a, models, data, save)
    measure_speed(a, models, data, save)
    save()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
