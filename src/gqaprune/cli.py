"""Command line: one subcommand per public function; this module parses and prints only."""

from __future__ import annotations

import argparse
import logging
import sys

from gqaprune.data.sources import data_dir
from gqaprune.console import console, ppl_line, run_guarded
from gqaprune.options import add_options, options_from_args


# ---------------------------------------------------------------- prune
def cmd_prune(ns) -> int:
    from rich.table import Table

    from gqaprune.prune.command import PruneOptions, prune

    opts = options_from_args(PruneOptions, ns)
    res = prune(opts)
    con = console()
    plan = res.plan
    t = Table(title="kept per layer", show_edge=False, pad_edge=False)
    for col in ("layer", "query heads", "KV heads", "Q:KV", "MLP channels"):
        t.add_column(col, justify="right")
    src = plan.source_shape
    for row in res.layers:
        i = row["layer"]
        t.add_row(str(i), f"{row['q_heads']}/{src['kv_per_layer'][i] * src['q_per_kv']}",
                  f"{row['kv_heads']}/{src['kv_per_layer'][i]}", f"{row['q_per_kv']}:1",
                  f"{row['mlp']}/{src['mlp_per_layer'][i]}")
    con.print(t)
    prov = plan.provenance
    con.print(f"[bold]model[/]      {opts.model}  ->  {res.output or '(not saved: --dry-run)'}")
    con.print(f"[bold]criterion[/]  {prov.get('criterion', 'from plan ' + str(opts.plan))}; layout {plan.layout}"
              + (f"; calibration: {prov['calibration']}" if prov.get("calibration") else ""))
    for note in res.notes:   # compensation, sensitivity, split and allocation search, steps
        con.print(f"[bold]note[/]       {note}")
    con.print(f"[bold]parameters[/] {res.params_before:,} -> {res.params_after:,}  "
              f"([bold]-{res.reduction:.2%}[/]; target -{prov.get('params_removed_target', 0) / res.params_before:.2%})")
    mem = f"peak RSS {res.peak_rss_mb:,.0f} MiB" + (f", peak GPU {res.peak_gpu_mb:,.0f} MiB" if res.peak_gpu_mb else "")
    con.print(f"[bold]time[/]       {res.wall_s:.1f} s wall; {mem}")
    for before, after in zip(res.ppl_before, res.ppl_after):
        con.print(f"[bold]PPL[/]        before {ppl_line(before)}")
        con.print(f"           after  {ppl_line(after)}  ({after['ppl'] / before['ppl']:.2f}x)")
    if res.output:
        con.print(f"[bold]saved[/]      {res.output}/ (safetensors, config, tokenizer, prune_plan.json, kept_units.png, "
                  "README.md model card)")
    from gqaprune.export.gguf import where_it_runs

    con.print("[bold]serve[/]      " + where_it_runs(plan.source_shape.get("family", "llama"), not plan.is_uniform(),
                                                     plan.layout))
    rec = opts.recipe_record
    if rec["name"]:
        from gqaprune.prune.recipes import measured

        given = "; ".join(f"--{k.replace('_', '-')} {v['given']} (given) over {v['recipe']}"
                          for k, v in rec["overridden"].items()) + "".join("; " + n for n in rec["adjusted"])
        con.print(f"[bold]recipe[/]     {rec['name']}" + (f" with {given}: the measured figures below are for the "
                                                         "recipe as defined" if given else ""))
        line = measured(rec["name"], opts.pruning_ratio or res.reduction)
        con.print(f"           {line}" if line else f"           (no measured figures for recipe {rec['name']}: "
                  "benchmarks/results/recipes_smollm2.json, in the source tree, has none)")
    return 0


# ---------------------------------------------------------------- eval
def cmd_eval(ns) -> int:
    from gqaprune.evaluate.suite import EvalOptions, evaluate_model

    opts = options_from_args(EvalOptions, ns)
    suite = evaluate_model(opts)
    for res in suite.results:
        if len(suite.results) > 1:
            print(f"== {res.model}" + (f" + {res.adapter}" if res.adapter else ""))
        for p in res.ppl:
            print(ppl_line(p))
        if res.zeroshot_md:
            print(res.zeroshot_md)
    if suite.comparison is not None:
        print(suite.comparison.markdown())
    if opts.output:
        print(f"saved {opts.output}/eval.json and eval.md")
    return 0


# ---------------------------------------------------------------- generate
def cmd_generate(ns) -> int:
    from gqaprune.generate import GenerateOptions, run_generate

    run_generate(options_from_args(GenerateOptions, ns))
    return 0


# ---------------------------------------------------------------- check
def cmd_check(ns) -> int:
    from rich.table import Table

    from gqaprune.check import CheckOptions, check

    opts = options_from_args(CheckOptions, ns)
    res = check(opts)
    con = console()
    lt = Table(title=f"layers of {opts.checkpoint}", show_edge=False)
    for col in ("layer", "query heads", "KV heads", "Q:KV", "MLP", ""):
        lt.add_column(col, justify="right")
    for row in res.layers:
        lt.add_row(str(row["layer"]), f"{row['q_heads']:g}", f"{row['kv_heads']:g}", f"{row['q_per_kv']:g}:1",
                   str(row["mlp"]), "ok" if row["ok"] else "[red]BROKEN[/]")
    con.print(lt)
    t = Table(title="pre-flight check")
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail", overflow="fold")
    for r in res.rows:
        t.add_row(r.name, "[green]PASS[/]" if r.ok else "[red]FAIL[/]", r.detail)
    con.print(t)
    con.print("[green bold]all checks passed[/]" if res.ok else "[red bold]some checks failed[/]")
    return 0 if res.ok else 1


# ---------------------------------------------------------------- finetune / merge / bench / run / report
def cmd_finetune(ns) -> int:
    from gqaprune.recover.finetune import FinetuneOptions, finetune

    res = finetune(options_from_args(FinetuneOptions, ns))
    print("\n".join(res.lines()))
    return 0


def cmd_merge(ns) -> int:
    from gqaprune.recover.merge import MergeOptions, merge

    res = merge(options_from_args(MergeOptions, ns))
    print("\n".join(res.lines()))
    return 0


def cmd_bench(ns) -> int:
    from gqaprune.bench.command import BenchOptions, bench

    res = bench(options_from_args(BenchOptions, ns))
    print(res.to_markdown())
    return 0


def cmd_run(ns) -> int:
    from gqaprune.pipeline import RunOptions, run_pipeline

    con = console()
    res = run_pipeline(options_from_args(RunOptions, ns), on_step=lambda s: con.rule(f"step: {s}"))
    con.rule("done")
    for s in res.steps:
        con.print(f"{s['step']:>8}: {s['status']} ({s['seconds']} s) -> {s['folder']}")
    con.print(f"report: {res.report}")
    return 0


def cmd_export(ns) -> int:
    from gqaprune.export.gguf import ExportOptions, export

    res = export(options_from_args(ExportOptions, ns))
    print("\n".join(res.lines()))
    return 0


def cmd_push(ns) -> int:
    from gqaprune.export.push import PushOptions, push

    print(f"pushed to {push(options_from_args(PushOptions, ns))}")
    return 0


def cmd_report(ns) -> int:
    from gqaprune.report import write_run_report

    path = write_run_report(ns.run_dir)
    print(path.read_text())
    print(f"wrote {path}")
    return 0


COMMANDS = {
    "prune": ("prune a model into a smaller checkpoint", "gqaprune.prune.options:PruneOptions", cmd_prune),
    "eval": ("perplexity (and zero-shot tasks) of a model", "gqaprune.evaluate.suite:EvalOptions", cmd_eval),
    "generate": ("generate text (streamed) with a model, or base + LoRA adapter; interactive without --prompt",
                 "gqaprune.generate:GenerateOptions", cmd_generate),
    "finetune": ("LoRA recovery fine-tuning (the seed guide's post_training.py flags)",
                 "gqaprune.recover.options:FinetuneOptions", cmd_finetune),
    "merge": ("merge a LoRA adapter into its base, check the logits, save", "gqaprune.recover.merge:MergeOptions",
              cmd_merge),
    "bench": ("prefill/decode speed and memory of models side by side, with FLOPs ratios",
              "gqaprune.bench.command:BenchOptions", cmd_bench),
    "run": ("one click: prune -> fine-tune -> merge -> evaluate -> report", "gqaprune.pipeline:RunOptions", cmd_run),
    "report": ("write REPORT.md for a `gqaprune run` folder", None, cmd_report),
    "check": ("pre-flight checklist for a pruned checkpoint (exit 1 on failure)", "gqaprune.check:CheckOptions",
              cmd_check),
    "export": ("write a checkpoint as one GGUF file for llama.cpp / Ollama / LM Studio (optionally quantized)",
               "gqaprune.export.gguf:ExportOptions", cmd_export),
    "push": ("publish a checkpoint folder (with its model card) to the Hugging Face Hub",
             "gqaprune.export.push:PushOptions", cmd_push),
}
# commands whose first option is given as a positional argument: command -> (field, help)
POSITIONAL = {"check": ("checkpoint", "checkpoint folder"), "export": ("checkpoint", "checkpoint folder to export"), "push": ("folder", "checkpoint folder to publish"),
              "report": ("run_dir", "the output_root of a `gqaprune run`")}


def _load(spec: str):
    import importlib

    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name)


def build_parser() -> argparse.ArgumentParser:
    from gqaprune import __version__

    p = argparse.ArgumentParser(prog="gqaprune", description="GQA-aware structured pruning for Llama, Mistral, Qwen2/2.5, "
                                "Qwen3, Gemma-2, Gemma-3 and Phi-3 models.")
    p.add_argument("--version", action="version", version=f"gqaprune {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, spec, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        pos = POSITIONAL.get(name)
        if pos:
            sp.add_argument(pos[0], help=pos[1])
        if spec is not None:
            add_options(sp, _load(spec), skip=(pos[0],) if pos else ())
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not ns.command:
        parser.print_help()
        return 2

    def command() -> int:
        data_dir()  # a wrong $GQAPRUNE_DATA_DIR fails now, not after minutes of work
        return COMMANDS[ns.command][2](ns)

    return run_guarded(f"gqaprune {ns.command}", ns.command, command)


if __name__ == "__main__":
    sys.exit(main())
