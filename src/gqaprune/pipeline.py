"""``gqaprune run`` / ``finetune_gqa_aware_pruned_v3.sh``: prune -> fine-tune -> merge -> evaluate -> report.

Every step writes its own folder under ``output_root`` and is skipped when that folder
is already complete, so an interrupted run continues where it stopped:

    ROOT/pruned/      gqaprune prune        (skipped if ROOT/pruned/config.json exists)
    ROOT/lora/        LoRA fine-tuning      (resumed from its last checkpoint if interrupted)
    ROOT/merged/      merged checkpoint
    ROOT/eval/        original vs pruned vs recovered: PPL, zero-shot, verdict
    ROOT/REPORT.md    the one-page report (also `gqaprune report ROOT`)

Defaults are the seed guide's hyperparameters. Environment variables override the model
(``GQAPRUNE_MODEL``), the instruction data (``GQAPRUNE_DATA_PATH``) and the output root
(``GQAPRUNE_OUTPUT_ROOT``). ``--profile quick`` cuts steps and evaluation tokens so the
whole pipeline finishes on a 2-core CPU with smollm2-135m in minutes; its report says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gqaprune.errors import GQAPruneError
from gqaprune.options import opt

log = logging.getLogger(__name__)

PROFILES = ("full", "quick")
QUICK_TASKS = ["piqa", "arc_easy", "boolq"]
FULL_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


@dataclass
class RunOptions:
    model: str = opt(os.environ.get("GQAPRUNE_MODEL", "smollm2-135m"),
                     "model to prune (env GQAPRUNE_MODEL)")
    output_root: str = opt(os.environ.get("GQAPRUNE_OUTPUT_ROOT", "runs/gqa_aware_v3"),
                           "folder for every step's output (env GQAPRUNE_OUTPUT_ROOT)")
    data_path: str = opt(os.environ.get("GQAPRUNE_DATA_PATH", "yahma/alpaca-cleaned"),
                         "instruction data for calibration and fine-tuning (env GQAPRUNE_DATA_PATH)")
    profile: str = opt("full", "full: the guide's settings; quick: few steps and eval tokens (CPU demo)",
                       choices=PROFILES)
    pruning_ratio: float = opt(0.2, "fraction of total parameters to remove")
    criterion: str = opt("taylor", "importance criterion")
    layout: str = opt("uniform", "uniform or per-layer")
    round_mlp_to: int | None = opt(None, "keep a multiple of M MLP channels per layer (128 recommended on GPUs)")
    num_samples: int | None = opt(None, "calibration samples for pruning (default: 64; quick: 16)")
    compensate: bool = opt(False, "prune: refit o_proj/down_proj of the kept units by least squares (gqaprune prune "
                           "--compensate)")
    steps: int = opt(1, "prune: remove the budget in K steps, re-scoring between them")
    allocation: str = opt("scores", "prune, per-layer layout: scores, sensitivity or search (see gqaprune prune)")
    split: str = opt("balanced", "prune: attention vs MLP share, balanced or search (see gqaprune prune)")
    calibration_format: str = opt("prompt", "prune: instruction data as calibration text, prompt (Alpaca template) "
                                  "or text (plain)")
    num_epochs: float = opt(2.0, "fine-tuning epochs (guide: 2)")
    learning_rate: float = opt(5e-5, "learning rate (guide: 5e-5)")
    batch_size: int = opt(128, "global batch (guide: 128)")
    micro_batch_size: int = opt(4, "micro batch (guide: 4)")
    cutoff_len: int = opt(256, "max tokens per example (guide: 256)")
    lora_r: int = opt(8, "LoRA rank (guide: 8)")
    lora_alpha: int = opt(16, "LoRA alpha (guide: 16)")
    wandb_project: str = opt("", "W&B project (guide: llama3-gqa-aware-finetune-v3)")
    tasks: list[str] = opt(factory=list, help="zero-shot tasks (default: the 7 of the guide; quick: piqa, arc_easy, boolq)")
    device: str | None = opt(None, "device (default: cuda if available)")
    overwrite: bool = opt(False, "start again: remove the steps' folders under output_root first")


@dataclass
class RunResult:
    output_root: str
    profile: str
    steps: list[dict] = field(default_factory=list)   # name, status (done|skipped), seconds, folder
    report: str = ""


def _profile_settings(opts: RunOptions) -> dict:
    """Per-step knobs of the profile. quick: budgets sized for smollm2-135m on a 2-core CPU."""
    if opts.profile == "quick":
        return {"num_samples": opts.num_samples or 16, "ppl_max_tokens": 8192, "max_steps": 12, "batch_size": 8,
                "micro_batch_size": 4, "val_set_size": 40, "max_train_samples": 400, "eval_steps": 6, "save_steps": 6,
                "extra_val_max_tokens": 4096, "tasks": opts.tasks or QUICK_TASKS, "limit": 20, "cutoff_len": 128}
    return {"num_samples": opts.num_samples or 64, "ppl_max_tokens": None, "max_steps": None,
            "batch_size": opts.batch_size, "micro_batch_size": opts.micro_batch_size, "val_set_size": 2000,
            "max_train_samples": None, "eval_steps": 100, "save_steps": 200, "extra_val_max_tokens": None, "tasks": opts.tasks or FULL_TASKS,
            "limit": None, "cutoff_len": opts.cutoff_len}


# options that do not change what a finished step computed: a resumed run may change them
_RESUME_FREE = ("overwrite", "device", "wandb_project")


def _check_resumable(root: Path, opts: RunOptions, step_dirs) -> None:
    """Refuse to reuse finished steps that were made with other options (they would be skipped)."""
    f = root / "run_options.json"
    if not f.is_file() or not any(d.is_dir() and any(d.iterdir()) for d in step_dirs):
        return
    try:
        old = json.loads(f.read_text())
    except (OSError, ValueError):
        return
    now = vars(opts)
    defaults = vars(RunOptions())
    diffs = [f"{k.replace('_', '-')} {old.get(k, defaults[k])!r} -> {now[k]!r}" for k in now
             if k not in _RESUME_FREE and old.get(k, defaults[k]) != now[k]]
    if diffs:
        raise GQAPruneError(
            f"{root}: holds a run made with other options ({'; '.join(diffs)}); its finished steps would be "
            "reused as they are. Pass --overwrite to start again there, or choose another --output-root.")


def run_pipeline(opts: RunOptions, *, on_step=None) -> RunResult:
    """Run every step that is not done yet; returns what ran and where the report is."""
    import shutil

    from gqaprune.evaluate.suite import EvalOptions, evaluate_model
    from gqaprune.finetune import FinetuneOptions, finetune
    from gqaprune.merge import merge_and_save_lora
    from gqaprune.prune.run import PruneOptions, prune
    from gqaprune.report import write_run_report

    if opts.profile not in PROFILES:
        raise GQAPruneError(f"--profile {opts.profile}: choose one of {', '.join(PROFILES)}")
    root = Path(opts.output_root)
    s = _profile_settings(opts)
    dirs = {k: root / k for k in ("pruned", "lora", "merged", "eval")}
    if opts.overwrite:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    else:
        _check_resumable(root, opts, dirs.values())
    root.mkdir(parents=True, exist_ok=True)
    (root / "run_options.json").write_text(json.dumps({**vars(opts), "settings": s}, indent=2, default=str))
    res = RunResult(str(root), opts.profile)
    calib = opts.data_path if opts.data_path.lower() not in ("yahma/alpaca-cleaned",) else "alpaca"

    def step(name, done: bool, fn):
        t = time.perf_counter()
        if done:
            res.steps.append({"step": name, "status": "skipped (already done)", "seconds": 0.0,
                              "folder": str(dirs.get(name, root))})
        else:
            if on_step:
                on_step(name)
            fn()
            res.steps.append({"step": name, "status": "done", "seconds": round(time.perf_counter() - t, 1),
                              "folder": str(dirs.get(name, root))})
        (root / "run_steps.json").write_text(json.dumps(res.steps, indent=2))

    step("pruned", (dirs["pruned"] / "config.json").is_file(), lambda: prune(PruneOptions(
        model=opts.model, output=str(dirs["pruned"]), pruning_ratio=opts.pruning_ratio, criterion=opts.criterion,
        layout=opts.layout, calibration=calib, num_samples=s["num_samples"], round_mlp_to=opts.round_mlp_to,
        compensate=opts.compensate, steps=opts.steps, allocation=opts.allocation, split=opts.split,
        calibration_format=opts.calibration_format,
        eval_ppl=["wikitext2"], ppl_max_tokens=s["ppl_max_tokens"], device=opts.device)))

    lora_done = (dirs["lora"] / "finetune_summary.json").is_file()
    resume = "last" if (dirs["lora"].is_dir() and any(dirs["lora"].glob("checkpoint-*")) and not lora_done) else None
    step("lora", lora_done, lambda: finetune(FinetuneOptions(
        prune_model=str(dirs["pruned"]), data_path=opts.data_path, output_dir=str(dirs["lora"]),
        wandb_project=opts.wandb_project, num_epochs=opts.num_epochs, learning_rate=opts.learning_rate,
        batch_size=s["batch_size"], micro_batch_size=s["micro_batch_size"], cutoff_len=s["cutoff_len"],
        val_set_size=s["val_set_size"], lora_r=opts.lora_r, lora_alpha=opts.lora_alpha,
        extra_val_dataset=["wikitext2"], cache_dataset=True, max_steps=s["max_steps"],
        max_train_samples=s["max_train_samples"], eval_steps=s["eval_steps"], save_steps=s["save_steps"],
        extra_val_max_tokens=s["extra_val_max_tokens"], resume_from_checkpoint=resume, device=opts.device,
        warmup_steps=100 if opts.profile == "full" else 2)))

    step("merged", (dirs["merged"] / "config.json").is_file(), lambda: merge_and_save_lora(
        str(dirs["pruned"]), str(dirs["lora"]), str(dirs["merged"]), device=opts.device))

    step("eval", (dirs["eval"] / "eval.json").is_file(), lambda: evaluate_model(EvalOptions(
        model=str(dirs["pruned"]), recovered=str(dirs["merged"]), base_model=opts.model, ppl=["wikitext2"],
        max_tokens=s["ppl_max_tokens"], tasks=s["tasks"], limit=s["limit"], output=str(dirs["eval"]),
        device=opts.device)))

    res.report = str(write_run_report(root))
    return res
