#!/usr/bin/env python
"""One-shot quality ablation on SmolLM2-135M (fp32, CPU): criterion x layout x compensation x steps.

Writes benchmarks/results/ablation_smollm2.md and .json: WikiText-2 test perplexity
(128-token windows, first --eval-tokens tokens) of every configuration, with the dense
model measured in the same run on the same tokens, as ratios to the dense model; the
compensation's per-layer reconstruction errors (fitted and held-out tokens); and a
robustness check: the best configuration at each ratio re-run with another calibration
sample (another seed = another slice of Alpaca), which should land within 10%.

Run from the repository root (about 1 h on 2 shared CPU cores; resumable: finished
rows in the JSON are kept and skipped when it is started again):
    GQAPRUNE_DATA_DIR=../shared/data python benchmarks/ablation_smollm2.py

The grid is staged so the expensive parts run only where they can matter:
  1. criterion (taylor, magnitude, activation) x compensation (off, on), uniform layout;
  2. taylor: uniform with the attention/MLP split searched, per-layer, per-layer with
     sensitivity allocation, and both; compensation on for the two best of these;
  3. the best configuration so far at each ratio with --steps (re-scored between steps);
  4. the best configuration at each ratio with calibration seed 1 (robustness);
  5. (only with --stages 5) the best configuration with --big-samples calibration samples;
  6. (only with --stages 6) criterion obs (greedy structured OBS: compensation-aware selection)
     in the best layout so far, compensated, at the default calibration size;
  7. (only with --stages 7) the robustness check of stage 4 for the stage-5 rows (seed 1 at
     --big-samples calibration samples);
  8. (only with --stages 8) the best stage-5 row refitted towards the dense model's residual
     stream (--compensate-target dense) instead of each unpruned sublayer;
  9. (only with --stages 9) criterion obs in the best stage-5 configuration, one step, at
     --big-samples calibration samples;
  10. (only with --stages 10) the best row at --big-samples with one more step;
  11. (only with --stages 11) the best row at any calibration size re-run with --big-samples
      calibration samples (e.g. 256: does more calibration data still help?);
  12. (only with --stages 12) the best row at --big-samples with --allocation search (the
      sensitivity allocation refined by local search on calibration KL) instead of sensitivity;
  13. (only with --stages 13) stage 12's row with calibration seed 1 (its robustness check,
      runnable before or beside stage 12).
  Stages 12 and 13 run the search with same-kind moves only (--search-moves same, the default);
  14 and 15 repeat them with mixed moves (a layer may also trade a KV group for the same
  parameters in MLP channels):
  14. (only with --stages 14) stage 12 with --search-moves mixed;
  15. (only with --stages 15) stage 14's row with calibration seed 1 (runnable beside 14);
  16. (only with --stages 16) stage 12 with the Alpaca records as plain text (--calibration-format
      text: no prompt template) for scoring, sensitivity, search and compensation;
  17. (only with --stages 17) stage 16's row with calibration seed 1 (runnable beside 16).
Efficiency: the dense model is loaded once, WikiText-2 tokenised once, each criterion
scored once per calibration seed (scores do not depend on layout or ratio), each
sensitivity measured once per (criterion, ratio); every row prunes a deepcopy.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import sys
import time
from pathlib import Path

from _common import log  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model reference (default: the built-in alias)")
    p.add_argument("--ratios", default="0.2,0.5", help="fractions of total parameters to remove")
    p.add_argument("--criteria", default="taylor,magnitude,activation", help="stage-1 criteria")
    p.add_argument("--eval-tokens", type=int, default=4096, help="score the first N WikiText-2 test tokens")
    p.add_argument("--window", type=int, default=128, help="perplexity window (stride = window)")
    p.add_argument("--calibration", default="alpaca", help="calibration data (gqaprune --calibration)")
    p.add_argument("--num-samples", type=int, default=32, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    p.add_argument("--sensitivity-samples", type=int, default=4, help="samples for --allocation sensitivity")
    p.add_argument("--steps", type=int, default=3, help="K for the iterative rows (stage 3)")
    p.add_argument("--stages", default="1,2,3,4", help="which stages to run (5: the best rows with "
                   "--big-samples calibration samples)")
    p.add_argument("--peers", default="", help="Torch-Pruning importances to run beside the grid on the same "
                   "tokens, e.g. 'magnitude,taylor' (kept in the JSON; rows already there are skipped)")
    p.add_argument("--search-evaluations", type=int, default=150, help="moves tried by --allocation search")
    p.add_argument("--search-samples", type=int, default=8, help="calibration samples --allocation search "
                   "measures KL on")
    p.add_argument("--big-samples", type=int, default=128, help="calibration samples for stage 5")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--out", default=str(HERE / "results" / "ablation_smollm2"), help="output path without extension")
    p.add_argument("--render", action="store_true", help="only re-render the Markdown from the JSON")
    return p.parse_args(argv)


def machine_info() -> dict:
    from _common import machine_info as common

    return common()

def key_of(c: dict) -> str:
    return "|".join(f"{k}={c[k]}" for k in sorted(c))


class Ablation:
    def __init__(self, args):
        self.args = args
        self.path = Path(args.out).with_suffix(".json")
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"rows": []}
        self.done = {r["key"]: r for r in self.data["rows"]}
        self.scores: dict = {}
        self.sens: dict = {}
        self.ids: dict = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    # ------------------------------------------------------------------ setup
    def setup(self):
        import torch

        from gqaprune.data.corpora import load_text_corpus
        from gqaprune.evaluate.perplexity import perplexity_of_ids, tokenize_corpus
        from gqaprune.models.io import load_model

        a = self.args
        t = time.perf_counter()
        self.model, self.tok = load_model(a.model, dtype="fp32", device="cpu")
        log(f"loaded {a.model} in {time.perf_counter() - t:.0f} s")
        corpus = load_text_corpus("wikitext2", "test")
        self.eval_ids = tokenize_corpus(self.tok, corpus.text)[: a.eval_tokens]
        self.corpus = corpus
        meta = self.data.get("meta") or {}
        if meta.get("date"):   # resuming: keep the earlier invocations on record
            meta.setdefault("earlier", []).append({k: meta.get(k) for k in ("date", "command")}
                                                  | {"loadavg_start": meta.get("machine", {}).get("loadavg_start")})
        meta.update({"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
                     "machine": machine_info(), "model": a.model,
                     "eval": {"dataset": corpus.dataset, "split": corpus.split, "source": corpus.source,
                              "window": a.window, "stride": a.window, "first_tokens": a.eval_tokens},
                     "calibration": {"source": a.calibration, "samples": a.num_samples, "seq_len": a.seq_len},
                     "sensitivity_samples": a.sensitivity_samples,
                     "allocation_search": {"evaluations": a.search_evaluations, "samples": a.search_samples}})
        self.data["meta"] = meta
        if not self.data.get("dense"):
            t = time.perf_counter()
            nll, n = perplexity_of_ids(self.model, self.eval_ids, seq_len=a.window, batch_size=a.batch_size,
                                       progress=False)
            self.data["dense"] = {"ppl": float(torch.tensor(nll).exp()), "nll": nll, "n_tokens": n,
                                  "params": sum(p.numel() for p in self.model.parameters()),
                                  "seconds": round(time.perf_counter() - t, 1)}
            self.save()
        log(f"dense PPL {self.data['dense']['ppl']:.2f} on {self.data['dense']['n_tokens']} tokens")

    def calib(self, seed: int, samples: int, fmt: str = "prompt"):
        from gqaprune.data.calibration import calibration_batch

        if (seed, samples, fmt) not in self.ids:
            self.ids[(seed, samples, fmt)] = calibration_batch(self.tok, self.args.calibration, samples,
                                                               self.args.seq_len, seed, fmt=fmt)
        return self.ids[(seed, samples, fmt)]

    def get_scores(self, criterion: str, seed: int, samples: int, fmt: str = "prompt"):
        from gqaprune.prune.command import PruneOptions
        from gqaprune.prune.steps import score_model
        from gqaprune.models.layout import model_layout

        k = (criterion, seed, samples, fmt)
        if k not in self.scores:
            ids, _ = self.calib(seed, samples, fmt)
            t = time.perf_counter()
            self.scores[k] = score_model(self.model, model_layout(self.model),
                                         PruneOptions(recipe="fast", criterion=criterion, calib_batch_size=self.args.batch_size),
                                         ids, seed=seed, progress=False)
            sec = round(time.perf_counter() - t, 1)
            name = f"{criterion}/seed{seed}" + (f"/{samples} samples" if samples != self.args.num_samples else "") \
                + (f"/{fmt}" if fmt != "prompt" else "")
            self.data.setdefault("scoring_seconds", {})[name] = sec
            log(f"scored {name} in {sec} s")
        return self.scores[k]

    # ------------------------------------------------------------------ one row
    def run(self, stage: int, ratio: float, criterion: str, layout: str = "uniform", allocation: str = "scores",
            split: str = "balanced", compensate: bool = False, steps: int = 1, target: str = "layer",
            seed: int = 0, samples: int | None = None, search_moves: str = "same",
            calibration_format: str = "prompt") -> dict:
        import torch

        from gqaprune.evaluate.perplexity import perplexity_of_ids
        from gqaprune.prune.command import PruneOptions, prune_model

        cfg = {"ratio": ratio, "criterion": criterion, "layout": layout, "allocation": allocation, "split": split,
               "compensate": compensate, "steps": steps, "target": target if compensate else None, "seed": seed}
        samples = samples or self.args.num_samples
        if samples != self.args.num_samples:   # rows at the default calibration size keep their old keys
            cfg["samples"] = samples
        if allocation == "search":
            cfg |= {"search_evaluations": self.args.search_evaluations, "search_samples": self.args.search_samples}
            if search_moves != "same":   # rows searched with same-kind moves keep their old keys
                cfg["search_moves"] = search_moves
        if calibration_format != "prompt":   # rows calibrated on the Alpaca template keep their old keys
            cfg["calibration_format"] = calibration_format
        key = key_of(cfg)
        if key in self.done:
            return self.done[key]
        a = self.args
        ids, calib_desc = self.calib(seed, samples, calibration_format)
        scores = self.get_scores(criterion, seed, samples, calibration_format)
        opts = PruneOptions(recipe="fast", pruning_ratio=ratio, criterion=criterion, layout=layout, allocation=allocation,
                            split=split, compensate=compensate, compensate_target=target, steps=steps, seed=seed,
                            calib_batch_size=a.batch_size, num_samples=samples, seq_len=a.seq_len,
                            sensitivity_samples=a.sensitivity_samples, search_evaluations=a.search_evaluations,
                            search_samples=a.search_samples, search_moves=search_moves,
                            calibration_format=calibration_format)
        t = time.perf_counter()
        sens = self.sens.get((criterion, ratio, seed, samples, calibration_format))
        pruned, plan = prune_model(copy.deepcopy(self.model), opts, ids, scores=scores, sensitivity=sens,
                                   progress=False)
        prune_s = time.perf_counter() - t
        if allocation in ("sensitivity", "search"):
            self.sens[(criterion, ratio, seed, samples, calibration_format)] = plan.provenance["sensitivity"]
        t = time.perf_counter()
        nll, n = perplexity_of_ids(pruned, self.eval_ids, seq_len=a.window, batch_size=a.batch_size, progress=False)
        ppl = float(torch.tensor(nll).exp())
        prov = plan.provenance
        row = {"key": key, "stage": stage, **cfg, "ppl": ppl, "nll": nll, "n_tokens": n,
               "x_dense": ppl / self.data["dense"]["ppl"], "params_after": prov["params_after"],
               "reduction": prov["reduction"], "kv_per_layer": plan.kept_kv, "mlp_per_layer": plan.kept_mlp,
               "prune_s": round(prune_s, 1), "eval_s": round(time.perf_counter() - t, 1), "calibration": calib_desc}
        if prov.get("compensation"):
            last = prov["compensation"][-1]
            row["compensation"] = {"summary": last["summary"], "tokens_fit": last["tokens_fit"],
                                   "tokens_heldout": last["tokens_heldout"], "layers": last["layers"],
                                   "seconds": [c["seconds"] for c in prov["compensation"]]}
        if prov.get("sensitivity"):
            row["sensitivity"] = {x["layer"]: round(x["weight"], 3) for x in prov["sensitivity"]["layers"]}
            row["sensitivity_seconds"] = prov["sensitivity"]["seconds"]
        if prov.get("allocation_search"):
            row["allocation_search"] = [{k: v for k, v in r.items() if k != "accepted"} | {"moves_kept": len(r["accepted"])}
                                        for r in prov["allocation_search"]]
        if prov.get("split_search"):
            row["split_search"] = [{"step": r["step"], "chosen_kv_fraction": r["chosen_kv_fraction"],
                                    "candidates": r["candidates"], "seconds": r["seconds"]}
                                   for r in prov["split_search"]]
        if prov.get("step_log"):
            row["step_log"] = [{k: v for k, v in s.items() if k in ("step", "params_after", "skipped")}
                               for s in prov["step_log"]]
        del pruned
        gc.collect()
        self.data["rows"].append(row)
        self.done[key] = row
        self.save()
        render(self.data, Path(self.args.out).with_suffix(".md"))
        log(f"stage {stage} {key}: PPL {ppl:.2f} ({row['x_dense']:.2f}x dense), -{row['reduction']:.1%}, "
            f"prune {prune_s:.0f} s")
        return row

    def run_peer(self, ratio: float, importance: str) -> dict | None:
        """Torch-Pruning (benchmarks/peers.py, its LLM example's recipe, eager attention) at the parameter
        count of gqaprune's uniform row at ``ratio``, scored on the same WikiText-2 tokens; Taylor reads
        gradients over the same calibration tokens (seed 0)."""
        import peers
        import torch

        from gqaprune.evaluate.perplexity import perplexity_of_ids

        key = f"tp|{importance}|{ratio}"
        done = {r["key"]: r for r in self.data.setdefault("peers", [])}
        if key in done:
            return done[key]
        ids, _ = self.calib(0, self.args.num_samples)
        base = copy.deepcopy(self.model)
        base.set_attn_implementation("eager")
        total = self.data["dense"]["params"]
        target = next((r["params_after"] for r in self.data["rows"] if r["ratio"] == ratio
                       and r["layout"] == "uniform"), round(total * (1 - ratio)))
        t = time.perf_counter()
        grads = peers.taylor_grads(base, ids, self.args.batch_size) if importance == "taylor" else None
        r_tp = peers.choose_ratio(base.config, target)
        example = torch.tensor(self.tok.encode("Hello world.")).unsqueeze(0)
        pruned, out = peers.tp_prune(base, example, importance, r_tp, grads=grads)
        row = {**out.to_dict(), "key": key, "tool": f"Torch-Pruning {peers.tp_version()}", "importance": importance,
               "ratio": ratio, "tp_ratio": r_tp, "prune_s": round(time.perf_counter() - t, 1)}
        if out.ok and out.runs == "ok":
            nll, n = perplexity_of_ids(pruned, self.eval_ids, seq_len=self.args.window, batch_size=self.args.batch_size,
                                       progress=False)
            row.update(ppl=float(torch.tensor(nll).exp()), n_tokens=n, reduction=1 - out.params / total)
            row["x_dense"] = row["ppl"] / self.data["dense"]["ppl"]
            log(f"Torch-Pruning {importance} at {ratio:.0%}: PPL {row['ppl']:.2f} ({row['x_dense']:.2f}x dense), "
                f"-{row['reduction']:.1%}")
        else:
            log(f"Torch-Pruning {importance} at {ratio:.0%}: {out.error or out.runs}")
        del pruned, base, grads
        gc.collect()
        self.data["peers"].append(row)
        self.save()
        render(self.data, Path(self.args.out).with_suffix(".md"))
        return row

    def best(self, ratio: float, seed: int = 0, samples: int | None | str = None, **match) -> dict | None:
        """Lowest-PPL row at ``ratio``/``seed`` and calibration size (None = the default size, "any" = any size)
        matching ``match``."""
        rows = [r for r in self.data["rows"] if r["ratio"] == ratio and r["seed"] == seed
                and (samples == "any" or r.get("samples") == samples) and all(r.get(k) == v for k, v in match.items())]
        return min(rows, key=lambda r: r["ppl"], default=None)


def config_of(r: dict) -> dict:
    return {k: r[k] for k in ("criterion", "layout", "allocation", "split", "compensate", "steps")} | \
        {"target": r["target"] or "layer"} | \
        ({"search_moves": r.get("search_moves", "same")} if r["allocation"] == "search" else {}) | \
        {"calibration_format": r.get("calibration_format", "prompt")}


def layout_label(r: dict) -> str:
    return r["layout"] + {"sensitivity": " + sensitivity", "search": " + sensitivity + allocation search"}.get(
        r["allocation"], "") + (" (mixed moves)" if r.get("search_moves") == "mixed" else "") + \
        (" + split search" if r.get("split") == "search" else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.render:
        render(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md"))
        return 0
    import torch

    torch.manual_seed(0)
    ab = Ablation(args)
    ab.setup()
    ratios = [float(x) for x in args.ratios.split(",")]
    criteria = [c for c in args.criteria.split(",") if c]
    stages = {int(s) for s in args.stages.split(",")}
    t0 = time.perf_counter()
    if 1 in stages:
        for ratio in ratios:
            for crit in criteria:
                for comp in (False, True):
                    ab.run(1, ratio, crit, compensate=comp)
    if 2 in stages:
        variants = [dict(layout="uniform", split="search"), dict(layout="per-layer"),
                    dict(layout="per-layer", allocation="sensitivity"),
                    dict(layout="per-layer", allocation="sensitivity", split="search")]
        for ratio in ratios:
            rows = [ab.run(2, ratio, "taylor", **v) for v in variants]
            ranked = sorted(zip(rows, variants), key=lambda rv: rv[0]["ppl"])
            for _, v in ranked[:2]:
                ab.run(2, ratio, "taylor", **v, compensate=True)
    if 3 in stages:
        for ratio in ratios:
            b = config_of(ab.best(ratio))
            if args.steps > 1 and b["steps"] == 1:
                ab.run(3, ratio, **(b | {"steps": args.steps}))
    if 4 in stages:
        for ratio in ratios:
            b = config_of(ab.best(ratio))
            ab.run(4, ratio, **b, seed=1)
    if 5 in stages:
        for ratio in ratios:
            b = config_of(ab.best(ratio))
            ab.run(5, ratio, **b, samples=args.big_samples)
    big = args.big_samples
    if 7 in stages:
        for ratio in ratios:
            if b := ab.best(ratio, samples=big):
                ab.run(7, ratio, **config_of(b), seed=1, samples=big)
    if 8 in stages:
        for ratio in ratios:
            if b := ab.best(ratio, samples=big, compensate=True):
                ab.run(8, ratio, **(config_of(b) | {"target": "dense"}), samples=big)
    for imp in [x for x in args.peers.split(",") if x]:
        for ratio in ratios:
            ab.run_peer(ratio, imp)
    if 6 in stages:
        for ratio in ratios:
            b = config_of(ab.best(ratio))
            ab.run(6, ratio, **(b | {"criterion": "obs", "compensate": True, "steps": 1}))
    if 9 in stages:
        for ratio in ratios:
            if b := ab.best(ratio, samples=big, criterion="taylor", compensate=True, target="layer"):
                ab.run(9, ratio, **(config_of(b) | {"criterion": "obs", "steps": 1}), samples=big)
    if 10 in stages:
        for ratio in ratios:
            if b := ab.best(ratio, samples=big):
                ab.run(10, ratio, **(config_of(b) | {"steps": b["steps"] + 1}), samples=big)
    if 11 in stages:
        for ratio in ratios:
            if b := ab.best(ratio, samples="any"):
                ab.run(11, ratio, **config_of(b), samples=big)
    if 12 in stages:
        for ratio in ratios:
            if b := ab.best(ratio, samples=big, allocation="sensitivity"):
                ab.run(12, ratio, **(config_of(b) | {"allocation": "search", "search_moves": "same"}), samples=big)
    if 13 in stages:
        for ratio in ratios:
            if b := ab.best(ratio, samples=big, allocation="sensitivity"):
                ab.run(13, ratio, **(config_of(b) | {"allocation": "search", "search_moves": "same"}), seed=1,
                       samples=big)
    for st, seed in ((14, 0), (15, 1)):
        if st in stages:
            for ratio in ratios:
                if b := ab.best(ratio, samples=big, allocation="sensitivity"):
                    ab.run(st, ratio, **(config_of(b) | {"allocation": "search", "search_moves": "mixed"}), seed=seed,
                           samples=big)
    for st, seed in ((16, 0), (17, 1)):
        if st in stages:
            for ratio in ratios:
                if b := ab.best(ratio, samples=big, allocation="sensitivity", calibration_format=None):
                    ab.run(st, ratio, **(config_of(b) | {"allocation": "search", "search_moves": "same",
                                                        "calibration_format": "text"}), seed=seed, samples=big)
    ab.data["meta"]["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
    ab.data["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    ab.save()
    render(ab.data, out.with_suffix(".md"))
    log(f"wrote {out.with_suffix('.md')}")
    return 0


# ---------------------------------------------------------------------- Markdown
def _f(x, nd=2):
    return "" if x is None else f"{x:.{nd}f}"


def _comp_cell(r: dict) -> str:
    c = r.get("compensation")
    if not c:
        return ""
    s = c["summary"]
    parts = []
    for kind, name in (("attn", "o"), ("mlp", "down")):
        k = s[kind]
        if k["sublayers"]:
            parts.append(f"{name} {_f(k['err_before'])}→{_f(k['err_after'])} "
                         f"(held-out {_f(k['heldout_before'])}→{_f(k['heldout_after'])})")
    return "; ".join(parts)


def render(data: dict, path: Path) -> None:
    meta, dense, rows = data.get("meta", {}), data.get("dense") or {}, data.get("rows", [])
    m, ev, cal = meta.get("machine", {}), meta.get("eval", {}), meta.get("calibration", {})
    L = []
    L.append("# One-shot pruning ablation: SmolLM2-135M (criterion × layout × compensation × steps)\n")
    L.append(f"- date: {meta.get('date')}; command: `{meta.get('command')}` (git {m.get('git')})")
    for e in meta.get("earlier", []):
        L.append(f"- rows resumed from an earlier invocation: {e.get('date')}, `{e.get('command')}` (load average "
                 f"{e.get('loadavg_start')} at start); each row's *stage* says how it was chosen")
    L.append(f"- machine: {m.get('cpu')}, {m.get('cores_visible')} cores visible (shared with other jobs; load "
             f"average {m.get('loadavg_start')} at start), torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, fp32 on CPU")
    L.append(f"- model: `{meta.get('model')}` (SmolLM2-135M-Instruct GGUF Q4_1, de-quantised to fp32), "
             f"{dense.get('params', 0):,} parameters")
    L.append(f"- evaluation: {ev.get('dataset')} {ev.get('split')} ({ev.get('source')}), window {ev.get('window')}, "
             f"stride {ev.get('stride')}, first {ev.get('first_tokens', 0):,} tokens "
             f"({dense.get('n_tokens', 0):,} tokens scored); never used for calibration or fitting")
    L.append(f"- calibration: {cal.get('source')}, {cal.get('samples')} samples × {cal.get('seq_len')} tokens "
             f"= {(cal.get('samples') or 0) * (cal.get('seq_len') or 0):,} tokens (seed 0; seed 1 = another shuffle "
             "of Alpaca for the robustness rows). The same tokens are used for scoring and for the compensation "
             "refit, which holds out the last 12.5% of the samples to check itself")
    L.append(f"- sensitivity allocation: {meta.get('sensitivity_samples')} calibration samples per probe")
    L.append(f"- **dense PPL {_f(dense.get('ppl'))}** (same run, same tokens)\n")
    L.append("Columns: *ratio* = target fraction of total parameters removed (tied embeddings counted once); "
             "*removed* = achieved; *comp* = `--compensate` (target `layer` unless stated); *refit error* = mean "
             "relative reconstruction error ||Y − Ŷ||/||Y|| of the pruned o_proj / down_proj outputs before → after "
             "the refit, on fitted tokens and on held-out calibration tokens.\n")
    L.append("| stage | ratio | criterion | layout | comp | steps | seed | calib samples | removed | PPL | × dense | "
             "refit error (mean over layers) | prune s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["ratio"], r["stage"], r["ppl"])):
        lay = layout_label(r)
        comp = ("yes" + (f" ({r['target']})" if r.get("target") not in (None, "layer") else "")) if r["compensate"] \
            else "no"
        L.append(f"| {r['stage']} | {r['ratio']:.0%} | {r['criterion']} | {lay} | {comp} | {r['steps']} | {r['seed']} "
                 f"| {r.get('samples', cal.get('samples'))}{' (plain text)' if r.get('calibration_format') == 'text' else ''} | {r['reduction']:.2%} | {r['ppl']:.2f} | {r['x_dense']:.2f} | {_comp_cell(r)} | {r['prune_s']:.0f} |")
    L.append("")
    if rows and dense:
        L.append("## Goals (issue 4, section 1)\n")
        for ratio, goal in ((0.2, 2.0), (0.5, 10.0)):
            rs = [r for r in rows if r["ratio"] == ratio and r["seed"] == 0]
            if not rs:
                continue
            for label, pool in (("best", rs), ("best at the default calibration size",
                                                [r for r in rs if "samples" not in r])):
                if not pool:
                    continue
                b = min(pool, key=lambda r: r["ppl"])
                if label != "best" and b is min(rs, key=lambda r: r["ppl"]):
                    continue
                verdict = "met" if b["x_dense"] <= goal else f"NOT met (missed by {b['x_dense'] / goal:.2f}x)"
                L.append(f"- ~{ratio:.0%}, {label}: {b['criterion']} / {layout_label(b)} / "
                         f"{'compensated' if b['compensate'] else 'no compensation'} / {b['steps']} step(s) / "
                         f"{b.get('samples', cal.get('samples'))} calibration samples"
                         f"{' (Alpaca as plain text)' if b.get('calibration_format') == 'text' else ''}: PPL {b['ppl']:.2f} = "
                         f"{b['x_dense']:.2f}x dense (goal <= {goal:g}x): **{verdict}**")
                rob = [r for r in rows if r["ratio"] == ratio and r["seed"] == 1 and config_of(r) == config_of(b)
                       and all(r.get(k) == b.get(k) for k in ("samples", "search_evaluations", "search_samples",
                                                               "search_moves"))]
                if rob:
                    d = rob[0]["ppl"] / b["ppl"] - 1
                    L.append(f"  - robustness, calibration seed 1 (another Alpaca slice): PPL {rob[0]['ppl']:.2f} "
                             f"({d:+.1%} vs seed 0): {'within' if abs(d) <= 0.10 else 'NOT within'} 10%")
                elif label == "best":
                    L.append("  - robustness, calibration seed 1 (another Alpaca slice): **not measured yet** (stage 7, "
                             "13 or 15)")
        L.append("")
    prs = [r for r in data.get("peers", []) if r.get("ppl") is not None]
    if prs and rows:
        L.append("## Torch-Pruning, same run, same tokens (its LLM example's recipe, eager attention, "
                 "no compensation)\n")
        L.append("| ratio | tool | importance | removed | PPL | × dense | gqaprune best PPL | TP / gqaprune best | goal ≥10x |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(prs, key=lambda r: (r["ratio"], r["ppl"])):
            b = min((x for x in rows if x["ratio"] == r["ratio"] and x["seed"] == 0), key=lambda x: x["ppl"])
            q = r["ppl"] / b["ppl"]
            L.append(f"| {r['ratio']:.0%} | {r['tool']} | {r['importance']} | {r['reduction']:.2%} | {r['ppl']:.2f} | "
                     f"{r['x_dense']:.2f} | {b['ppl']:.2f} | {q:.1f}x | {'met' if q >= 10 else '**not met**'} |")
        L.append("\nThe goal compares gqaprune's best row at each ratio with Torch-Pruning's best importance "
                 "(the lowest TP PPL per ratio is the one that counts).\n")
    comp_rows = [r for r in rows if r.get("compensation")]
    if comp_rows:
        b = min(comp_rows, key=lambda r: r["ppl"])
        c = b["compensation"]
        L.append(f"## Per-layer reconstruction error of the best compensated row ({b['ratio']:.0%}, {b['criterion']}, "
                 f"{layout_label(b)}, steps {b['steps']})\n")
        L.append(f"{c['tokens_fit']:,} tokens fitted, {c['tokens_heldout']:,} held out. Relative error "
                 "||Y − Ŷ||/||Y||: before = kept columns with their original weights, after = refit "
                 "(a refit the held-out tokens reject keeps the original weights, marked *kept*).\n")
        L.append("| layer | o_proj fit before → after | o_proj held-out before → after | down_proj fit before → after "
                 "| down_proj held-out before → after |")
        L.append("|---|---|---|---|---|")
        for x in c["layers"]:
            cells = []
            for kind in ("attn", "mlp"):
                y = x.get(kind)
                if not y:
                    cells += ["–", "–"]
                    continue
                tag = "" if y["refit"] else " *kept*"
                cells.append(f"{_f(y['err_before'], 3)} → {_f(y['err_after'], 3)}{tag}")
                cells.append(f"{_f(y['heldout_before'], 3)} → {_f(y['heldout_after'], 3)}")
            L.append(f"| {x['layer']} | " + " | ".join(cells) + " |")
        L.append("")
    sens_rows = [r for r in rows if r.get("sensitivity")]
    if sens_rows:
        L.append("## Sensitivity weights (per-layer factor on normalised scores; 1 = average layer)\n")
        for r in sens_rows:
            if r["compensate"]:
                continue
            w = " ".join(f"{i}:{v:.2f}" for i, v in r["sensitivity"].items())
            L.append(f"- {r['ratio']:.0%} {r['criterion']} ({layout_label(r)}): {w}")
            L.append(f"  - kept KV groups per layer: {r['kv_per_layer']}; MLP channels: {r['mlp_per_layer']}")
        L.append("")
    split_rows = [r for r in rows if r.get("split_search") and not r["compensate"]]
    if split_rows:
        L.append("## Split search (share of KV groups removed -> KL per token from the dense model on calibration "
                 "samples; the lowest is kept)\n")
        for r in split_rows:
            for sr in r["split_search"]:
                c = ", ".join(f"{x['kv_fraction']:.0%}: {x['kl']:.4f}" if "kl" in x else f"{x['kv_fraction']:.0%}: "
                              "infeasible" for x in sr["candidates"])
                L.append(f"- {r['ratio']:.0%} {r['criterion']} ({layout_label(r)}): {c} -> chose "
                         f"{sr['chosen_kv_fraction']:.0%}")
        L.append("")
    search_rows = [r for r in rows if r.get("allocation_search")]
    if search_rows:
        L.append("## Allocation search (`--allocation search`: calibration KL per token from the dense model, "
                 "start = sensitivity allocation → end; *check* = the next samples, never searched on)\n")
        for r in search_rows:
            for sr in r["allocation_search"]:
                chk = "" if sr.get("check_kl_start") is None else \
                    f"; check {sr['check_samples']} samples {sr['check_kl_start']:.4f} → {sr['check_kl_end']:.4f}"
                step = f" step {sr['step']}" if r["steps"] > 1 else ""
                L.append(f"- {r['ratio']:.0%} {r['criterion']}{step}, {r.get('samples', cal.get('samples'))} calibration "
                         f"samples: KL {sr['kl_start']:.4f} → {sr['kl_end']:.4f} on {sr['tokens']:,} tokens "
                         f"({sr['moves_kept']} of {sr['evaluations']} moves kept{chk}; "
                         + (f"{sr['moves']} moves, {sr['kv_traded']:+d} KV groups traded for MLP channels; "
                            if sr.get("moves") == "mixed" else "") +
                         f"{'used' if sr.get('used', True) else 'rejected'}; {sr['seconds']:.0f} s)")
            L.append(f"  - kept KV groups per layer: {r['kv_per_layer']}; MLP channels: {r['mlp_per_layer']}")
        L.append("")
    if data.get("scoring_seconds"):
        L.append("Scoring time (s, once per criterion and seed, shared by rows): "
                 + ", ".join(f"{k} {v}" for k, v in data["scoring_seconds"].items()))
    if meta.get("wall_s_this_invocation") is not None:
        L.append(f"\nWall time of the last invocation: {meta['wall_s_this_invocation'] / 60:.1f} min; load average "
                 f"at its end {meta.get('loadavg_end')}.")
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
