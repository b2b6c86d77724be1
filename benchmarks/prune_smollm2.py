#!/usr/bin/env python
"""SmolLM2-135M (fp32, CPU): every criterion x layout at 20% / 50% of total parameters removed.

Writes benchmarks/results/prune_smollm2.md and .json: WikiText-2 test perplexity at
windows 128 and 512 (as ratios to the dense model on the same tokens), prune wall time,
peak memory, achieved parameter counts, and Torch-Pruning (the seed guide's "v2") at
the nearest parameter count its knob allows.

Run from the repository root (takes about 30 minutes on 2 shared CPU cores):
    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/prune_smollm2.py

Efficiency, so the whole matrix fits in that time:
  * the dense model is loaded once, WikiText-2 is tokenised once;
  * each criterion is scored once (scores do not depend on layout or ratio) and that
    is timed; each (layout, ratio) plan is applied to a deepcopy of the dense model;
  * perplexity uses the first --max-tokens tokens (default 2048; --full for all);
    one forward of SmolLM2-135M costs ~7 ms per token on these cores when they are
    quiet (2-4x more when shared), and 29 models x 2 windows are scored;
  * in-process peak RSS is monotone over the run, so peak memory is measured on the
    full CLI path (``gqaprune prune``) in subprocesses for a few configurations,
    beside a subprocess that only loads the model.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import git_rev, log  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

CRITERIA_ALL = ("taylor", "taylor-vector", "taylor-second", "magnitude", "activation", "random")
LAYOUTS_ALL = ("uniform", "per-layer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model reference (default: the built-in alias)")
    p.add_argument("--criteria", default=",".join(CRITERIA_ALL), help="comma-separated criteria")
    p.add_argument("--layouts", default=",".join(LAYOUTS_ALL), help="comma-separated layouts")
    p.add_argument("--ratios", default="0.2,0.5", help="fractions of total parameters to remove")
    p.add_argument("--windows", default="128,512", help="perplexity window lengths (stride = window)")
    p.add_argument("--max-tokens", type=int, default=2048, help="score only the first N WikiText-2 test tokens")
    p.add_argument("--full", action="store_true", help="score the whole WikiText-2 test split (slow on CPU)")
    p.add_argument("--calibration", default="alpaca", help="calibration data (gqaprune --calibration)")
    p.add_argument("--num-samples", type=int, default=16, help="calibration samples")
    p.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0, help="calibration / random-criterion seed")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward/backward")
    p.add_argument("--ppl-batch-tokens", type=int, default=1024, help="tokens per PPL forward (windows = this / window)")
    p.add_argument("--tp-importances", default="magnitude,taylor", help="Torch-Pruning importances, or 'none'")
    p.add_argument("--no-tp-sdpa", action="store_true", help="skip the attempt to run Torch-Pruning with SDPA")
    p.add_argument("--memory-configs", default="taylor:uniform:0.2,magnitude:uniform:0.5",
                   help="criterion:layout:ratio runs of the full CLI in a subprocess for peak RSS, or 'none'")
    p.add_argument("--out", default=str(HERE / "results" / "prune_smollm2"), help="output path without extension")
    p.add_argument("--render", metavar="JSON", help="only re-render the Markdown from a results JSON")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- machine
from _common import run_measured  # noqa: E402  (re-exported for callers)


def machine_info() -> dict:
    from _common import machine_info as common
    from peers import tp_version

    return common(torch_pruning=tp_version())

# ----------------------------------------------------------------------------- helpers
class Results:
    """Everything measured, written to JSON after every row so a crash leaves what was done."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "dense": None, "rows": [], "scoring": {}, "tp": {"rows": []}, "memory": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def eval_ppl(model, tok, ids, windows, max_tokens, batch_tokens) -> dict:
    from gqaprune.evaluate.perplexity import perplexity

    out = {}
    for w in windows:
        t = time.perf_counter()
        r = perplexity(model, tok, "wikitext2", seq_len=w, max_tokens=max_tokens, ids=ids,
                       batch_size=max(1, batch_tokens // w),
                       progress=False)
        d = r.to_dict()
        d["eval_s"] = round(time.perf_counter() - t, 1)
        out[str(w)] = d
    return out


def layer_summary(model) -> dict:
    from gqaprune.models.layout import model_layout

    lay = model_layout(model)  # raises if any layer breaks Q:KV = r with the config's head_dim
    kv = [s.n_kv for s in lay.layers]
    mlp = [s.n_mlp for s in lay.layers]
    return {"q_per_kv": lay.q_per_kv, "kv_min": min(kv), "kv_max": max(kv), "mlp_min": min(mlp), "mlp_max": max(mlp),
            "kv_per_layer": kv, "mlp_per_layer": mlp, "class": type(model).__name__}


def peak_rss_self_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- main run
def run(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("GQAPRUNE_DATA_DIR") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["GQAPRUNE_DATA_DIR"] = str(REPO.parent / "shared" / "data")

    from gqaprune.data.corpora import load_text_corpus
    from gqaprune.errors import GQAPruneError
    from gqaprune.evaluate.perplexity import tokenize_corpus
    from gqaprune.models.io import load_model
    from gqaprune.data.calibration import calibration_batch
    from gqaprune.prune.score import score_units
    from gqaprune.prune.budget import Budget
    from gqaprune.prune.plan import make_plan
    from gqaprune.models.layout import count_params, model_layout
    from gqaprune.prune.surgery import apply_plan

    criteria = [c for c in args.criteria.split(",") if c]
    layouts = [x for x in args.layouts.split(",") if x]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    windows = [int(w) for w in args.windows.split(",") if w]
    max_tokens = None if args.full else args.max_tokens
    t_start = time.perf_counter()

    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "git": git_rev(), "machine": machine_info(), "model": args.model, "dtype": "fp32", "device": "cpu",
        "criteria": criteria, "layouts": layouts, "ratios": ratios, "windows": windows, "max_tokens": max_tokens,
        "data_dir": os.environ.get("GQAPRUNE_DATA_DIR"),
    }
    res = Results(Path(args.out).with_suffix(".json"), meta)
    log(f"machine: {meta['machine']['cpu']}, {meta['machine']['cores_visible']} cores visible, "
        f"load average {meta['machine']['loadavg_start']}")

    t = time.perf_counter()
    model, tok = load_model(args.model, dtype="fp32", device="cpu")
    meta["load_s"] = round(time.perf_counter() - t, 1)
    layout = model_layout(model)
    meta["params_dense"] = layout.total_params
    meta["shape"] = {"layers": layout.num_layers, "hidden": layout.hidden_size, "head_dim": layout.head_dim,
                     "q_per_kv": layout.q_per_kv, "kv_heads": layout.layers[0].n_kv, "mlp": layout.layers[0].n_mlp}
    log(f"loaded {args.model} in {meta['load_s']} s: {layout.total_params:,} params, shape {meta['shape']}")

    t = time.perf_counter()
    corpus = load_text_corpus("wikitext2", "test")
    ids = tokenize_corpus(tok, corpus.text)
    meta["eval"] = {"dataset": corpus.dataset, "split": corpus.split, "source": corpus.source,
                    "split_tokens": int(ids.numel()), "tokenize_s": round(time.perf_counter() - t, 1)}
    log(f"wikitext2 test: {ids.numel():,} tokens; scoring the first {max_tokens or ids.numel():,}")

    dense = eval_ppl(model, tok, ids, windows, max_tokens, args.ppl_batch_tokens)
    res.data["dense"] = {"params": layout.total_params, "ppl": dense}
    res.save()
    log("dense: " + "; ".join(f"w{w} PPL {d['ppl']:.2f} ({d['n_tokens']} tok, {d['eval_s']} s)"
                              for w, d in dense.items()))

    # Calibration data: built once, shared by every data-driven criterion (and TP-Taylor).
    t = time.perf_counter()
    calib, calib_desc = calibration_batch(tok, args.calibration, args.num_samples, args.calib_seq_len, args.seed)
    calib_s = time.perf_counter() - t
    meta["calibration"] = {"source": args.calibration, "desc": calib_desc, "num_samples": args.num_samples,
                           "seq_len": args.calib_seq_len, "tokens": int(calib.numel()), "seed": args.seed,
                           "batch_size": args.batch_size, "build_s": round(calib_s, 1)}
    log(f"calibration: {calib_desc} ({calib_s:.1f} s)")

    achieved: dict[tuple, int] = {}
    for crit in criteria:
        needs_data = crit not in ("magnitude", "random")
        t = time.perf_counter()
        try:
            scores = score_units(model, layout, crit, calib if needs_data else None, seed=args.seed,
                                 batch_size=args.batch_size, progress=False)
        except Exception as e:  # noqa: BLE001 - record, keep going
            res.data["scoring"][crit] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{crit}: scoring FAILED: {e}")
            continue
        score_s = time.perf_counter() - t + (calib_s if needs_data else 0.0)
        res.data["scoring"][crit] = {"score_s": round(score_s, 2), "includes_calibration_data_s": needs_data}
        log(f"{crit}: scored in {score_s:.1f} s")
        for lay_kind in layouts:
            for ratio in ratios:
                row = {"criterion": crit, "layout": lay_kind, "ratio": ratio, "score_s": round(score_s, 2)}
                try:
                    t = time.perf_counter()
                    plan = make_plan(layout, scores, Budget(ratio, None).resolve(layout), layout_kind=lay_kind,
                                     provenance={"criterion": crit, "calibration": calib_desc if needs_data else None,
                                                 "seed": args.seed})
                    plan_s = time.perf_counter() - t
                    t = time.perf_counter()
                    work = copy.deepcopy(model)
                    copy_s = time.perf_counter() - t
                    t = time.perf_counter()
                    pruned = apply_plan(work, plan)
                    surgery_s = time.perf_counter() - t
                    del work
                    params = count_params(pruned)
                    if params != plan.provenance["params_after"]:
                        raise RuntimeError(f"plan predicted {plan.provenance['params_after']} params, got {params}")
                    row.update(params=params, reduction=1 - params / layout.total_params, plan_s=round(plan_s, 3),
                               surgery_s=round(surgery_s, 3), deepcopy_s=round(copy_s, 2),
                               prune_s=round(score_s + plan_s + surgery_s, 2), layers=layer_summary(pruned))
                    achieved[(crit, lay_kind, ratio)] = params
                    row["ppl"] = eval_ppl(pruned, tok, ids, windows, max_tokens, args.ppl_batch_tokens)
                    del pruned
                except (GQAPruneError, RuntimeError, ValueError) as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                gc.collect()
                res.data["rows"].append(row)
                res.save()
                if "error" in row:
                    log(f"{crit} {lay_kind} {ratio:.0%}: FAILED {row['error']}")
                else:
                    log(f"{crit} {lay_kind} {ratio:.0%}: {row['params']:,} params (-{row['reduction']:.2%}), "
                        + "; ".join(f"w{w} PPL {d['ppl']:.2f} (x{d['ppl'] / dense[w]['ppl']:.2f})"
                                    for w, d in row["ppl"].items())
                        + f", prune {row['prune_s']:.1f} s [elapsed {time.perf_counter() - t_start:.0f} s]")
        del scores
        gc.collect()

    if args.tp_importances != "none":
        run_tp(args, res, model, tok, ids, windows, max_tokens, calib, ratios, achieved, layout, dense)

    del model
    gc.collect()
    if args.memory_configs != "none":
        run_memory(args, res)

    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    meta["peak_rss_self_mb"] = round(peak_rss_self_mb(), 1)
    meta["machine"]["loadavg_end"] = list(os.getloadavg())
    res.save()
    log(f"done in {meta['total_s']:.0f} s")
    return res.data


def run_tp(args, res, model, tok, ids, windows, max_tokens, calib, ratios, achieved, layout, dense):
    import torch

    import peers

    imps = [x for x in args.tp_importances.split(",") if x]
    tpd = res.data["tp"]
    tpd["version"] = peers.tp_version()
    tpd["recipe"] = ("MetaPruner(global_pruning=False, pruning_ratio=r, head_pruning_ratio=r, num_heads={q,k,v}, "
                     "prune_num_heads=True, prune_head_dims=False, ignored_layers=[lm_head], round_to=4), "
                     "as examples/LLMs/prune_llm.py; attn_implementation=eager")
    base = copy.deepcopy(model)
    base.set_attn_implementation("eager")
    example = torch.tensor(tok.encode("Hello world.")).unsqueeze(0)  # the example's tracing input

    if not args.no_tp_sdpa:
        t = time.perf_counter()
        tpd["sdpa"] = peers.trace_failure_sdpa(model, example, ratios[0])
        tpd["sdpa_s"] = round(time.perf_counter() - t, 1)
        log(f"Torch-Pruning with SDPA attention: {tpd['sdpa']}")
        gc.collect()

    grads, grads_s = None, 0.0
    if "taylor" in imps:
        t = time.perf_counter()
        grads = peers.taylor_grads(base, calib, args.batch_size)
        grads_s = time.perf_counter() - t
        tpd["taylor_grads_s"] = round(grads_s, 1)
        log(f"Torch-Pruning Taylor: gradients over {calib.shape[0]}x{calib.shape[1]} calibration tokens "
            f"in {grads_s:.1f} s")

    for ratio in ratios:
        target = achieved.get(("taylor", "uniform", ratio)) or next(
            (v for k, v in achieved.items() if k[2] == ratio), round(layout.total_params * (1 - ratio)))
        r = peers.choose_ratio(base.config, target)
        for imp in imps:
            row = {"importance": imp, "target_ratio": ratio, "target_params": target, "tp_ratio": r}
            work = copy.deepcopy(base)
            pruned, out = peers.tp_prune(work, example, imp, r, grads=grads)
            row.update(out.to_dict())
            row["prune_s_total"] = round(out.prune_s + (grads_s if imp == "taylor" else 0.0), 2)
            if out.ok:
                row["reduction"] = 1 - out.params / layout.total_params
                if out.runs == "ok":
                    try:
                        row["ppl"] = eval_ppl(pruned, tok, ids, windows, max_tokens, args.ppl_batch_tokens)
                    except Exception as e:  # noqa: BLE001
                        row["ppl_error"] = f"{type(e).__name__}: {e}"[:300]
                if imp == imps[0]:
                    with tempfile.TemporaryDirectory() as d:
                        row["save_reload"] = peers.save_reload(pruned, tok, Path(d) / "tp", example)
            del pruned, work
            gc.collect()
            tpd["rows"].append(row)
            res.save()
            if out.ok:
                ppl = "; ".join(f"w{w} PPL {d['ppl']:.2f} (x{d['ppl'] / dense[w]['ppl']:.2f})"
                                for w, d in row.get("ppl", {}).items()) or row.get("ppl_error", out.runs)
                log(f"Torch-Pruning {imp} r={r} (target {ratio:.0%}): {out.params:,} params "
                    f"(-{row['reduction']:.2%}; predicted {out.predicted_params:,}), q heads {sorted(set(out.q_heads))}, "
                    f"kv heads {sorted(set(out.kv_heads))}, hidden {out.hidden}, {ppl}, prune {row['prune_s_total']} s"
                    + (f", save/reload: {row['save_reload']}" if "save_reload" in row else ""))
            else:
                log(f"Torch-Pruning {imp} r={r}: FAILED {out.error}")
    del base, grads
    gc.collect()


def run_memory(args, res):
    env = dict(os.environ)
    exe = shutil.which("gqaprune")
    cli = [exe] if exe else [sys.executable, "-m", "gqaprune.cli"]
    load_only = [sys.executable, "-c",
                 "from gqaprune.models.io import load_model; "
                 f"load_model({args.model!r}, dtype='fp32', device='cpu')"]
    log("memory: subprocess that only loads the model ...")
    r = run_measured(load_only, env)
    r["config"] = "load only"
    res.data["memory"].append(r)
    res.save()
    log(f"memory: load only: peak RSS {r['peak_rss_mb']:.0f} MiB, {r['wall_s']} s (rc {r['rc']})")
    for spec in args.memory_configs.split(","):
        crit, lay, ratio = spec.split(":")
        with tempfile.TemporaryDirectory() as d:
            cmd = [*cli, "prune", "--recipe", "fast", "--model", args.model, "--pruning-ratio", ratio, "--criterion", crit,
                   "--layout", lay, "--calibration", args.calibration, "--num-samples", str(args.num_samples),
                   "--seq-len", str(args.calib_seq_len), "--seed", str(args.seed), "--dtype", "fp32",
                   "--device", "cpu", "--output", str(Path(d) / "out")]
            log(f"memory: {' '.join(cmd[len(cli):])} ...")
            r = run_measured(cmd, env)
        r["config"] = f"{crit} {lay} {float(ratio):.0%}"
        r["cmd"] = ["gqaprune", *cmd[len(cli):-1], "OUT"]
        res.data["memory"].append(r)
        res.save()
        log(f"memory: {r['config']}: peak RSS {r['peak_rss_mb']:.0f} MiB, wall {r['wall_s']} s (rc {r['rc']})")


# ----------------------------------------------------------------------------- markdown
def _f(x, nd=2):
    return "—" if x is None else f"{x:,.{nd}f}"


def _g(x: float) -> str:
    """PPL or ratio: 2 decimals below 100, none above (1,307,691 not 1307691.17)."""
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def findings(data: dict) -> list[str]:
    """Statements computed from the numbers (so a re-run with other numbers cannot contradict them)."""
    meta, dense = data["meta"], data["dense"]
    w0 = str(meta["windows"][0])
    ok = [r for r in data["rows"] if "ppl" in r]
    if not ok:
        return []

    def x(r):
        return r["ppl"][w0]["ppl"] / dense["ppl"][w0]["ppl"]

    out = ["## Findings (computed from the table, window " + w0 + ")", ""]
    for ratio in meta["ratios"]:
        for lay in meta["layouts"]:
            rs = sorted((r for r in ok if r["ratio"] == ratio and r["layout"] == lay), key=x)
            if rs:
                out.append(f"- {ratio:.0%} {lay}: best {rs[0]['criterion']} (x{_g(x(rs[0]))} dense), order: "
                           + " < ".join(f"{r['criterion']} ({_g(x(r))})" for r in rs) + ".")
    same = [(a, b) for a in ok if a["criterion"] == "taylor" for b in ok
            if b["criterion"] == "taylor-second" and (b["layout"], b["ratio"]) == (a["layout"], a["ratio"])]
    if same:
        n_eq = sum(all(a["ppl"][w]["ppl"] == b["ppl"][w]["ppl"] for w in a["ppl"]) for a, b in same)
        out.append(f"- taylor-second gave exactly taylor's perplexities (so the same kept units) in {n_eq} of "
                   f"{len(same)} configurations: its added term, (w·g)²/2, is second order in the already small "
                   "w·g. It costs more time to score.")
    pairs = [(a, b) for a in ok if a["criterion"] == "magnitude" for b in ok
             if b["criterion"] == "random" and (b["layout"], b["ratio"]) == (a["layout"], a["ratio"])]
    worse = [a for a, b in pairs if x(a) > x(b)]
    if pairs:
        out.append(f"- magnitude (L2, data-free) is worse than random in {len(worse)} of {len(pairs)} "
                   "configurations here (one-shot, no fine-tuning).")
    for ratio in meta["ratios"]:
        best = min((r for r in ok if r["ratio"] == ratio), key=x, default=None)
        for tr in data.get("tp", {}).get("rows", []):
            if tr["target_ratio"] != ratio or "ppl" not in tr or best is None:
                continue
            xt = tr["ppl"][w0]["ppl"] / dense["ppl"][w0]["ppl"]
            out.append(f"- {ratio:.0%}: Torch-Pruning {tr['importance']} x{_g(xt)} dense at {tr['params']:,} params "
                       f"({(tr['params'] - tr['target_params']) / tr['target_params']:+.2%} vs gqaprune's count) vs "
                       f"gqaprune's best here, {best['criterion']} {best['layout']}, x{_g(x(best))} "
                       f"({max(xt, x(best)) / min(xt, x(best)):.1f}x {'worse' if xt > x(best) else 'better'}); its "
                       f"Q:KV is "
                       f"{'/'.join(f'{q / k:g}' for q, k in sorted(set(zip(tr['q_heads'], tr['kv_heads']))))}.")
    out.append("")
    return out


def render(data: dict) -> str:
    meta, dense = data["meta"], data["dense"]
    windows = [str(w) for w in meta["windows"]]
    mach = meta["machine"]
    cal = meta.get("calibration", {})
    ev = meta.get("eval", {})
    P0 = meta["params_dense"]
    L = []
    L.append("# gqaprune on SmolLM2-135M: criteria x layouts vs Torch-Pruning")
    L.append("")
    L.append(f"- **Date**: {meta['date']} (git {meta.get('git')}); total run time "
             f"{_f(meta.get('total_s', 0) / 60, 1)} min.")
    L.append(f"- **Machine**: {mach['cpu']}, {mach['cores_visible']} CPU cores visible "
             f"(shared with other jobs: load average {', '.join(f'{x:.1f}' for x in mach['loadavg_start'])} at start, "
             f"{', '.join(f'{x:.1f}' for x in mach.get('loadavg_end', []))} at end), {mach.get('ram_gib')} GiB RAM, "
             f"torch {mach['torch']} ({mach['torch_threads']} threads), transformers {mach['transformers']}, "
             f"torch-pruning {mach.get('torch_pruning')}, Python {mach['python']}. Wall times depend on that load.")
    L.append(f"- **Command**: `{meta['command']}` (from the repository root, "
             f"`GQAPRUNE_DATA_DIR={meta.get('data_dir')}`).")
    L.append(f"- **Model**: `{meta['model']}` (SmolLM2-135M-Instruct Q4_1 GGUF de-quantised), fp32 on CPU, "
             f"{P0:,} parameters (tied embeddings counted once); {meta['shape']['layers']} layers, hidden "
             f"{meta['shape']['hidden']}, {meta['shape']['kv_heads'] * meta['shape']['q_per_kv']} query / "
             f"{meta['shape']['kv_heads']} KV heads (Q:KV {meta['shape']['q_per_kv']}), head_dim "
             f"{meta['shape']['head_dim']}, MLP {meta['shape']['mlp']}. Loaded once in {meta.get('load_s')} s.")
    if cal:
        L.append(f"- **Calibration** (gqaprune criteria and Torch-Pruning Taylor): {cal['desc']} "
                 f"({cal['num_samples']} samples x {cal['seq_len']} tokens = {cal['tokens']:,} tokens, seed "
                 f"{cal['seed']}, batch {cal['batch_size']}). magnitude and random use no data.")
    d0 = dense["ppl"][windows[0]]
    tok_desc = "; ".join(f"window {w}: stride {dense['ppl'][w]['stride']}, {dense['ppl'][w]['n_tokens']:,} tokens scored"
                         for w in windows)
    cut = f"the first {meta['max_tokens']:,} tokens" if meta.get("max_tokens") else "all tokens"
    L.append(f"- **Perplexity**: {d0['dataset']} {d0['split']} (`{ev.get('source')}`, {ev.get('split_tokens', 0):,} "
             f"tokens in the split), {cut} of the split tokenised once, non-overlapping windows; {tok_desc}. "
             "Every model, dense, gqaprune and Torch-Pruning, is scored on exactly these tokens. "
             "PPL = exp(mean NLL); **x dense** = PPL / dense PPL at the same window.")
    L.append("- **Budget**: the ratio is the fraction of the model's *total* parameters removed "
             "(not LLM-Pruner's per-layer channel ratio). No layers protected (keep-first/keep-last 0), min MLP 1.")
    L.append("- **Prune time** (in process) = scoring the criterion (once; plus building the calibration batch "
             "for data-driven criteria) + make_plan + surgery. Model load and checkpoint saving are excluded here; "
             "the memory table below times the whole CLI path including them. No fine-tuning anywhere.")
    L.append("")
    L.append("## Results")
    L.append("")
    hdr = "| ratio | method | criterion | layout | params | removed | " + \
        " | ".join(f"PPL@{w} | x dense" for w in windows) + " | prune s | kept per layer (KV groups / MLP) |"
    L.append(hdr)
    L.append("|" + "---|" * (hdr.count("|") - 1))
    dense_cells = " | ".join(f"{_g(dense['ppl'][w]['ppl'])} | 1.00" for w in windows)
    L.append(f"| 0% | dense | — | — | {P0:,} | 0.00% | {dense_cells} | — | "
             f"{meta['shape']['kv_heads']} / {meta['shape']['mlp']} |")
    tp_rows = data.get("tp", {}).get("rows", [])
    for ratio in meta["ratios"]:
        for lay in meta["layouts"]:
            for crit in meta["criteria"]:
                row = next((r for r in data["rows"] if r["criterion"] == crit and r["layout"] == lay
                            and r["ratio"] == ratio), None)
                if row is None:
                    continue
                if "error" in row:
                    L.append(f"| {ratio:.0%} | gqaprune | {crit} | {lay} | — | — | "
                             + " | ".join("— | —" for _ in windows) + f" | — | failed: {row['error'][:160]} |")
                    continue
                cells = " | ".join(f"{_g(row['ppl'][w]['ppl'])} | {_g(row['ppl'][w]['ppl'] / dense['ppl'][w]['ppl'])}"
                                   for w in windows)
                ly = row["layers"]
                kept = (f"{ly['kv_min']} / {ly['mlp_min']}" if ly["kv_min"] == ly["kv_max"] and ly["mlp_min"] == ly["mlp_max"]
                        else f"{ly['kv_min']}–{ly['kv_max']} / {ly['mlp_min']}–{ly['mlp_max']}")
                L.append(f"| {ratio:.0%} | gqaprune | {crit} | {lay} | {row['params']:,} | {row['reduction']:.2%} | "
                         f"{cells} | {row['prune_s']:.1f} | {kept}, Q:KV {ly['q_per_kv']} |")
        for tr in [t for t in tp_rows if t["target_ratio"] == ratio]:
            name = f"Torch-Pruning {data['tp'].get('version', '')}"
            if not tr.get("ok"):
                L.append(f"| {ratio:.0%} | {name} | {tr['importance']} | r={tr['tp_ratio']} | — | — | "
                         + " | ".join("— | —" for _ in windows) + f" | — | failed: {tr.get('error')} |")
                continue
            if "ppl" in tr:
                cells = " | ".join(f"{_g(tr['ppl'][w]['ppl'])} | {_g(tr['ppl'][w]['ppl'] / dense['ppl'][w]['ppl'])}"
                                   for w in windows)
            else:
                cells = " | ".join(f"failed: {tr.get('ppl_error') or tr.get('runs')} | —" for _ in windows)
            q = sorted(set(tr["q_heads"]))
            kv = sorted(set(tr["kv_heads"]))
            qkv = sorted({q_ / k_ for q_, k_ in zip(tr["q_heads"], tr["kv_heads"])})
            L.append(f"| {ratio:.0%} | {name} | {tr['importance']} | its own (r={tr['tp_ratio']}) | {tr['params']:,} | "
                     f"{tr['reduction']:.2%} | {cells} | {tr['prune_s_total']:.1f} | "
                     f"{'/'.join(map(str, kv))} KV heads, {'/'.join(map(str, q))} q heads (Q:KV "
                     f"{'/'.join(f'{x:g}' for x in qkv)}) / {'/'.join(map(str, sorted(set(tr['mlp']))))}; hidden "
                     f"{tr['hidden']} |")
    L.append("")
    L.append("Scoring time per criterion (once, shared by its 4 plans): "
             + ", ".join(f"{c} {s['score_s']:.1f} s" if "score_s" in s else f"{c} failed ({s['error']})"
                         for c, s in data["scoring"].items()) + ".")
    L.append("")

    tpd = data.get("tp", {})
    if tpd.get("rows"):
        L.append("## Torch-Pruning: what it did")
        L.append("")
        L.append(f"- Recipe: {tpd.get('recipe')}. Importances: magnitude = `GroupMagnitudeImportance(p=2, "
                 "group_reduction='mean')` (the example's GroupNormImportance); taylor = `GroupTaylorImportance()` "
                 "on the LM-loss gradient summed over the same calibration batch "
                 f"({_f(tpd.get('taylor_grads_s'), 1)} s for the gradients, included in its prune time).")
        L.append("- Matching the budget: TP's knob is `pruning_ratio` (= `head_pruning_ratio`), applied per group to "
                 "hidden channels, MLP channels and query heads. The ratio was chosen by a search over its predicted "
                 "parameter count (no evaluation) to be nearest gqaprune's taylor/uniform achieved count; the table "
                 "shows what it achieved. Its granularity is coarse: the hidden size moves the embedding "
                 "(49,152 rows) and every projection at once.")
        for tr in tpd["rows"]:
            if not tr.get("ok"):
                L.append(f"- {tr['importance']} at r={tr['tp_ratio']} (target {tr['target_ratio']:.0%}): **failed**: "
                         f"`{tr.get('error')}`")
                continue
            L.append(f"- {tr['importance']} at r={tr['tp_ratio']} (target {tr['target_params']:,} params, "
                     f"{tr['target_ratio']:.0%}): {tr['params']:,} params ({tr['reduction']:.2%} removed; predicted "
                     f"{tr['predicted_params']:,}). Per layer: KV heads {tr['kv_heads'][0]} (all kept) in every "
                     f"layer: {sorted(set(tr['kv_heads']))}; query heads {sorted(set(tr['q_heads']))} -> Q:KV "
                     f"{sorted({q / k for q, k in zip(tr['q_heads'], tr['kv_heads'])})} instead of "
                     f"{data['meta']['shape']['q_per_kv']}; hidden {data['meta']['shape']['hidden']} -> {tr['hidden']}; "
                     f"MLP {sorted(set(tr['mlp']))}. Right after pruning, `lm_head.weight` and "
                     f"`embed_tokens.weight` were two separate (equal) tensors, {tr['params_raw']:,} parameters "
                     f"counted naively; re-tied as the config says: {tr['retied']}. Forward after the attribute fix: "
                     f"{tr.get('runs')}."
                     + (f" save_pretrained + from_pretrained (in process, stock transformers): {tr['save_reload']}."
                        if tr.get("save_reload") else " (save/reload tried on the magnitude model of the same shape.)"))
        if "sdpa" in tpd:
            L.append(f"- With `attn_implementation='sdpa'` (the default) instead of eager: {tpd['sdpa']}")
        L.append("")

    mem = data.get("memory", [])
    if mem:
        L.append("## Peak memory (full CLI path, one subprocess each)")
        L.append("")
        L.append("| run | peak RSS MiB | wall s | exit | command |")
        L.append("|---|---|---|---|---|")
        for m in mem:
            cmd = " ".join(m["cmd"]) if m["config"] != "load only" else "python -c 'load_model(...)' (fp32, cpu)"
            L.append(f"| {m['config']} | {_f(m['peak_rss_mb'], 0)} | {m['wall_s']} | {m['rc']} | `{cmd}` |")
        L.append("")
        L.append(f"Measured with {mem[0]['method']}. The CLI run includes loading the GGUF, calibration, "
                 "surgery and writing the checkpoint (safetensors + plan + PNG) to a temporary folder. "
                 f"The benchmark process itself peaked at {_f(meta.get('peak_rss_self_mb'), 0)} MiB "
                 "(it holds the dense model plus one pruned copy at a time, and Torch-Pruning's copies).")
        L.append("")
    L.extend(findings(data))
    L.append("## Notes")
    L.append("")
    ntok = dense["ppl"][windows[0]]["n_tokens"]
    L.append(f"- One run, one seed, one calibration sample; differences between criteria of a few percent are "
             f"within the noise of a {ntok:,}-token evaluation (all models see the same tokens, so the ranking "
             "is paired). Ratios to dense at the same window are the comparable quantity; absolute values move "
             "with the window and the token count (`--max-tokens N`, `--full`).")
    L.append("- No recovery fine-tuning: these are one-shot numbers. At 50% of *total* parameters removed, "
             "gqaprune takes everything from attention and MLP (embeddings, 28M of the 135M, are never pruned), "
             "so every layer is left with 1 of 3 KV groups and about a third of its MLP; Torch-Pruning also "
             "narrows the hidden size (embedding, norms, every projection's input) and so spends the same budget "
             "differently.")
    L.append("- uniform models are stock `LlamaForCausalLM`; per-layer models are gqaprune's "
             "`GQAPrunedLlamaForCausalLM` (remote code in saved checkpoints). Q:KV is kept at "
             f"{data['meta']['shape']['q_per_kv']} in every layer of every gqaprune model (checked by model_layout).")
    L.append("- Regenerate the Markdown from the JSON without re-running: "
             "`python benchmarks/prune_smollm2.py --render benchmarks/results/prune_smollm2.json`.")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        out = Path(args.render).with_suffix(".md")
        out.write_text(render(data))
        print(out)
        return 0
    data = run(args)
    md = Path(args.out).with_suffix(".md")
    md.write_text(render(data))
    log(f"wrote {md} and {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
