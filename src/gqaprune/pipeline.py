"""``gqaprune run`` / ``finetune_gqa_aware_pruned_v3.sh``: prune -> fine-tune -> merge -> evaluate -> report.

Every step writes its own folder under ``output_root`` and is skipped when that folder is
complete and was made with the same options, so an interrupted run continues where it stopped:

    ROOT/pruned/      gqaprune prune
    ROOT/lora/        LoRA fine-tuning      (resumed from its last checkpoint if interrupted)
    ROOT/merged/      merged checkpoint
    ROOT/eval/        original vs pruned vs recovered: PPL, zero-shot, verdict
    ROOT/REPORT.md    the one-page report (also `gqaprune report ROOT`)

Each step's options (the exact PruneOptions / FinetuneOptions / merge / EvalOptions it ran
with) are recorded in ``run_steps.json``. On a rerun, a finished step whose options differ is
refused (exit 2, the differences listed) when it is one that later steps build on, since
reusing it would be silently wrong and redoing it would discard work; the evaluation, which
nothing builds on, is simply redone. ``--overwrite`` starts again (only in a folder gqaprune wrote).

Defaults are the seed guide's hyperparameters. ``--profile quick`` shrinks the steps so the
whole pipeline finishes on a 2-core CPU with smollm2-135m in minutes; explicit flags win over
the profile, and the report says which values ran. The model, the instruction data and the
output root default to ``$GQAPRUNE_MODEL``, ``$GQAPRUNE_DATA_PATH`` and ``$GQAPRUNE_OUTPUT_ROOT``
(read when the options are built, not at import).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gqaprune.data.instructions import CALIBRATION_FORMATS
from gqaprune.errors import GQAPruneError
from gqaprune.options import DeviceArgs, opt
from gqaprune.outputs import RunFolder, atomic_write
from gqaprune.prune.allocate import ALLOCATIONS, SPLITS
from gqaprune.prune.plan import LAYOUTS
from gqaprune.prune.score import CRITERIA
from gqaprune.recover.options import LoraArgs

log = logging.getLogger(__name__)

PROFILES = ("full", "quick")
QUICK_TASKS = ["piqa", "arc_easy", "boolq"]
FULL_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
STEPS = ("pruned", "lora", "merged", "eval")
# per profile: the value of every option left unset (None) on the command line
PROFILE_DEFAULTS = {
    "full": {"num_samples": 64, "batch_size": 128, "micro_batch_size": 4, "cutoff_len": 256, "max_steps": None,
             "val_set_size": 2000, "max_train_samples": None, "eval_steps": 100, "save_steps": 200,
             "warmup_steps": 100, "ppl_max_tokens": None, "extra_val_max_tokens": None, "limit": None,
             "tasks": FULL_TASKS},
    "quick": {"num_samples": 16, "batch_size": 8, "micro_batch_size": 4, "cutoff_len": 128, "max_steps": 12,
              "val_set_size": 40, "max_train_samples": 400, "eval_steps": 6, "save_steps": 6, "warmup_steps": 2,
              "ppl_max_tokens": 8192, "extra_val_max_tokens": 4096, "limit": 20, "tasks": QUICK_TASKS},
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass
class RunOptions(LoraArgs, DeviceArgs):
    model: str | None = opt(None, "model to prune (default: $GQAPRUNE_MODEL, else smollm2-135m)")
    output_root: str | None = opt(None, "folder for every step's output (default: $GQAPRUNE_OUTPUT_ROOT, else "
                                        "runs/gqa_aware_v3)")
    data_path: str | None = opt(None, "instruction data for calibration and fine-tuning (default: "
                                      "$GQAPRUNE_DATA_PATH, else yahma/alpaca-cleaned)")
    profile: str = opt("full", "full: the guide's settings; quick: few steps and eval tokens (CPU demo); explicit "
                       "flags win over the profile", choices=PROFILES)
    pruning_ratio: float = opt(0.2, "fraction of total parameters to remove")
    criterion: str = opt("taylor", "importance criterion (see gqaprune prune)", choices=tuple(CRITERIA))
    layout: str = opt("uniform", "uniform or per-layer (see gqaprune prune)", choices=LAYOUTS)
    round_mlp_to: int | None = opt(None, "keep a multiple of M MLP channels per layer (hardware-friendly widths)")
    num_samples: int | None = opt(None, "calibration samples for pruning (full: 64; quick: 16)")
    compensate: bool = opt(False, "prune: refit o_proj/down_proj of the kept units by least squares (gqaprune prune "
                           "--compensate)")
    steps: int = opt(1, "prune: remove the budget in K steps, re-scoring between them")
    allocation: str = opt("scores", "prune, per-layer layout: how layers share the budget (see gqaprune prune)",
                          choices=ALLOCATIONS)
    split: str = opt("balanced", "prune: attention vs MLP share (see gqaprune prune)", choices=SPLITS)
    calibration_format: str = opt("prompt", "prune: instruction data as calibration text, prompt (Alpaca template) "
                                  "or text (plain)", choices=CALIBRATION_FORMATS)
    num_epochs: float = opt(2.0, "fine-tuning epochs (guide: 2)")
    learning_rate: float = opt(5e-5, "learning rate (guide: 5e-5)")
    batch_size: int | None = opt(None, "global batch (full: 128, the guide's; quick: 8)")
    micro_batch_size: int | None = opt(None, "micro batch (full and quick: 4)")
    cutoff_len: int | None = opt(None, "max tokens per example (full: 256, the guide's; quick: 128)")
    max_steps: int | None = opt(None, "stop fine-tuning after this many optimizer steps (full: epochs; quick: 12)")
    wandb_project: str = opt("", "W&B project (guide: llama3-gqa-aware-finetune-v3)")
    tasks: list[str] = opt(factory=list, help="zero-shot tasks (full: the 7 of the guide; quick: piqa, arc_easy, "
                                              "boolq)")
    overwrite: bool = opt(False, "start again: replace the output root (only if gqaprune wrote it)")

    def __post_init__(self) -> None:
        super().__post_init__()
        from gqaprune.evaluate.zeroshot import parse_tasks

        self.model = self.model or _env("GQAPRUNE_MODEL", "smollm2-135m")
        self.output_root = self.output_root or _env("GQAPRUNE_OUTPUT_ROOT", "runs/gqa_aware_v3")
        self.data_path = self.data_path or _env("GQAPRUNE_DATA_PATH", "yahma/alpaca-cleaned")
        if self.tasks:
            self.tasks = parse_tasks(self.tasks)

    def setting(self, name: str):
        """The value that runs: the flag when given, else the profile's."""
        v = getattr(self, name, None)
        return PROFILE_DEFAULTS[self.profile][name] if v in (None, []) else v


@dataclass
class RunResult:
    output_root: str
    profile: str
    steps: list[dict] = field(default_factory=list)   # step, status (done|skipped|redone), seconds, folder
    report: str = ""


# ------------------------------------------------------------------------------ each step's options
def step_options(opts: RunOptions, root: Path) -> dict:
    """step -> the options object it runs with (built, so every value is checked before any step runs)."""
    from gqaprune.evaluate.suite import EvalOptions
    from gqaprune.prune.options import PruneOptions
    from gqaprune.recover.finetune import FinetuneOptions
    from gqaprune.recover.merge import MergeOptions

    d = {k: root / k for k in STEPS}
    calib = "alpaca" if opts.data_path.lower() == "yahma/alpaca-cleaned" else opts.data_path
    s = opts.setting
    prune = PruneOptions(recipe="fast", model=opts.model, output=str(d["pruned"]), pruning_ratio=opts.pruning_ratio,
                         criterion=opts.criterion, layout=opts.layout, calibration=calib,
                         num_samples=s("num_samples"), round_mlp_to=opts.round_mlp_to, compensate=opts.compensate,
                         steps=opts.steps, allocation=opts.allocation, split=opts.split,
                         calibration_format=opts.calibration_format, eval_ppl=["wikitext2"],
                         ppl_max_tokens=s("ppl_max_tokens"), device=opts.device, overwrite=True)
    lora = FinetuneOptions(
        prune_model=str(d["pruned"]), data_path=opts.data_path, output_dir=str(d["lora"]),
        wandb_project=opts.wandb_project, num_epochs=opts.num_epochs, learning_rate=opts.learning_rate,
        batch_size=s("batch_size"), micro_batch_size=s("micro_batch_size"), cutoff_len=s("cutoff_len"),
        val_set_size=s("val_set_size"), lora_r=opts.lora_r, lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout, lora_target_modules=list(opts.lora_target_modules),
        extra_val_dataset=["wikitext2"], cache_dataset=True, max_steps=s("max_steps"),
        max_train_samples=s("max_train_samples"), eval_steps=s("eval_steps"), save_steps=s("save_steps"),
        extra_val_max_tokens=s("extra_val_max_tokens"), device=opts.device, warmup_steps=s("warmup_steps"))
    merge = MergeOptions(pruned_model=str(d["pruned"]), lora_dir=str(d["lora"]), output_dir=str(d["merged"]),
                         device=opts.device, overwrite=True)
    ev = EvalOptions(model=str(d["pruned"]), recovered=str(d["merged"]), base_model=opts.model, ppl=["wikitext2"],
                     max_tokens=s("ppl_max_tokens"), tasks=s("tasks"), limit=s("limit"), output=str(d["eval"]),
                     device=opts.device, overwrite=True)
    return {"pruned": prune, "lora": lora, "merged": merge, "eval": ev}


# options that change no result: a finished step is reused whatever they are
_RESULT_FREE = {"output", "output_dir", "overwrite", "device", "wandb_project", "resume_from_checkpoint",
                "tensorboard", "logging_steps", "cache_dataset", "cache_dir"}


def _fingerprint(o) -> dict:
    return {k: v for k, v in dataclasses.asdict(o).items() if k not in _RESULT_FREE}


def _diffs(old: dict, new: dict) -> list[str]:
    return [f"{k.replace('_', '-')} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _finished(root: Path) -> dict:
    """step -> what run_steps.json recorded for it (status, options)."""
    try:
        return {s["step"]: s for s in json.loads((root / "run_steps.json").read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _lora_status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "finetune_summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _is_done(name: str, folder: Path) -> bool:
    """Whether a step's folder holds its finished result (a diverged fine-tune is not finished)."""
    if name == "lora":
        return _lora_status(folder) == "completed"
    return (folder / ("eval.json" if name == "eval" else "config.json")).is_file()


def plan_steps(opts: RunOptions, root: Path, steps: dict) -> dict[str, str]:
    """step -> 'run' | 'skip' | 'redo'.

    A finished step is skipped when its recorded options are the current ones, redone when
    they differ and it is the evaluation, and refused when they differ for a step later steps
    build on. A diverged fine-tune is redone when its options changed, else refused with advice.
    """
    old = _finished(root) if not opts.overwrite else {}
    decisions, changed = {}, []
    for name in STEPS:
        folder, rec = root / name, old.get(name) or {}
        diffs = _diffs(rec["options"], _fingerprint(steps[name])) if rec.get("options") is not None else []
        if name == "lora" and _lora_status(folder) == "diverged":
            if not diffs:
                raise GQAPruneError(f"{folder}: the fine-tuning step diverged (see {folder / 'finetune_summary.json'}); "
                                    "rerunning it with the same options diverges again. Lower --learning-rate (or "
                                    "change another fine-tuning option) and run again: the step then starts over.")
            decisions[name] = "redo"
        elif not _is_done(name, folder):
            decisions[name] = "run"
        elif diffs and name != "eval":
            changed.append(f"{name}: " + "; ".join(diffs))
        else:
            decisions[name] = "redo" if diffs else "skip"
    if changed:
        raise GQAPruneError(f"{root}: holds a run whose finished steps were made with other options "
                            f"({' | '.join(changed)}); they would be reused as they are. Pass --overwrite to start "
                            "again there, or choose another --output-root.")
    for i, name in enumerate(STEPS):   # a step that runs again invalidates every step after it
        if decisions[name] != "skip":
            for later in STEPS[i + 1:]:
                decisions[later] = "redo" if decisions[later] == "skip" else decisions[later]
            break
    return decisions


# ------------------------------------------------------------------------------ the command
def run_pipeline(opts: RunOptions, *, on_step=None) -> RunResult:
    """Run every step that is not done yet; returns what ran and where the report is."""
    from gqaprune.evaluate.suite import evaluate_model
    from gqaprune.prune.command import prune
    from gqaprune.recover.finetune import finetune
    from gqaprune.recover.merge import merge
    from gqaprune.report import write_run_report

    root = Path(opts.output_root).expanduser()
    steps = step_options(opts, root)
    decision = RunFolder.prepare(root, "run", flag="--output-root", overwrite=opts.overwrite, reuse=True,
                                 inputs={"--model": _local(opts.model), "--data-path": opts.data_path})
    plan = plan_steps(opts, root, steps)
    folder = RunFolder.open(root, "run", decision)
    folder.add("run_options.json", "run_steps.json", "REPORT.md", *STEPS)
    atomic_write(root / "run_options.json", json.dumps({**dataclasses.asdict(opts), "settings": {
        k: opts.setting(k) for k in PROFILE_DEFAULTS[opts.profile]}}, indent=2, default=str))
    res = RunResult(str(root), opts.profile)
    actions = {"pruned": lambda: prune(steps["pruned"]), "lora": lambda: finetune(_resumable(steps["lora"])),
               "merged": lambda: merge(steps["merged"]), "eval": lambda: evaluate_model(steps["eval"])}
    for name in STEPS:
        t = time.perf_counter()
        if plan[name] != "skip":
            if on_step:
                on_step(name)
            actions[name]()
        status = {"skip": "skipped (already done)", "run": "done", "redo": "redone (options changed)"}[plan[name]]
        res.steps.append({"step": name, "status": status, "seconds": round(time.perf_counter() - t, 1),
                          "folder": str(root / name), "options": _fingerprint(steps[name])})
        atomic_write(root / "run_steps.json", json.dumps(res.steps, indent=2, default=str))
    res.report = str(write_run_report(root))
    return res


def _local(ref: str):
    from gqaprune.models.io import local_path

    return local_path(ref)


def _resumable(o):
    """The fine-tuning options, resuming from the last checkpoint when an interrupted run left one."""
    lora = Path(o.output_dir)
    if lora.is_dir() and any(lora.glob("checkpoint-*")) and not _is_done("lora", lora):
        return dataclasses.replace(o, resume_from_checkpoint="last")
    return dataclasses.replace(o, overwrite=True)
