"""A fine-tuning run's ``output_dir``: start fresh, resume or replace, decided before any work, on top of
``gqaprune.outputs`` (its rules: docs/architecture.md, "Outputs").

* ``plan_run_dir`` (read-only, every process) checks the folder before the model or data are
  loaded: it refuses an output_dir that is, contains or lies inside an input (--prune_model,
  --data_path, --distill_from, a --resume_from_checkpoint outside output_dir); it reads the
  earlier run's record (``outputs.MANIFEST`` of kind ``finetune``, or the legacy
  ``run_manifest.json`` of earlier versions) and compares options; ``--overwrite`` replaces
  only a folder every entry of which gqaprune's manifest claims, else it names the others.
* ``open_run_dir`` (rank 0, once the inputs have loaded) clears a replaced run, trims metrics
  after the resume point and writes the manifest, claiming what the run is about to write.
  The manifest is rewritten on every claim (``outputs.RunFolder``), so an interrupted run's
  folder is still recognised as gqaprune's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from gqaprune.errors import GQAPruneError
from gqaprune.outputs import MANIFEST, RunFolder, check_not_input, check_writable, foreign_entries, read_manifest
from gqaprune.recover.metrics import METRICS, trim_after

log = logging.getLogger(__name__)

KIND = "finetune"
FLAG = "--output_dir"
SUMMARY = "finetune_summary.json"
PLOT = "training_curves.png"
LEGACY_MANIFEST = "run_manifest.json"   # the run record before gqaprune_manifest.json (read, never written)
# What a legacy run (no gqaprune manifest) wrote at the top of output_dir; nothing else is taken as its own.
_LEGACY_FILES = {LEGACY_MANIFEST, METRICS, SUMMARY, PLOT, "gqaprune_adapter.json", "adapter_config.json",
                 "adapter_model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "wandb", "tensorboard"}
_LEGACY_PATTERN = re.compile(r"^(checkpoint-\d+|samples_rank\d+\.txt)$")
# Options that may change between a run and its resumption without making it another run.
RESUMABLE_CHANGES = {
    "output_dir", "resume_from_checkpoint", "overwrite", "max_steps", "num_epochs", "eval_steps", "save_steps",
    "save_total_limit", "logging_steps", "wandb_project", "tensorboard", "extra_val_dataset", "extra_val_max_tokens",
    "ppl_seq_len", "device", "cache_dataset", "cache_dir", "log_sample_ids", "allow_pickle", "gradient_checkpointing",
    "fused_kernels",
}


@dataclass
class RunPlan:
    """What ``plan_run_dir`` decided: ``decision`` is fresh | resume | overwrite."""

    out: Path
    decision: str
    resume: str | None = None        # the checkpoint-N folder to resume from
    resume_step: int | None = None   # its optimizer step


# ------------------------------------------------------------------------------ the run's record
def manifest_options(opts) -> dict:
    """The options as the manifest records them (local inputs as absolute paths)."""
    d = asdict(opts)
    for name in ("prune_model", "data_path"):
        p = Path(str(getattr(opts, name))).expanduser()
        if p.exists():
            d[name] = str(p.resolve())
    return d


def manifest_diff(old: dict, new: dict, defaults: dict) -> list[str]:
    """The options that make ``new`` another run than ``old`` (RESUMABLE_CHANGES aside).

    A run recorded before an option existed ran with that option's default (``defaults``).
    """
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k in RESUMABLE_CHANGES:
            continue
        if old.get(k, defaults.get(k)) != new.get(k):
            diffs.append(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now")
    return diffs


def _defaults(opts) -> dict:
    return {f.name: f.default for f in dataclasses.fields(opts) if f.default is not dataclasses.MISSING}


def read_run_record(out: Path) -> dict | None:
    """The earlier run in ``out``: {"kind", "options", "legacy"}; None when gqaprune did not write the folder."""
    m = read_manifest(out)
    if m is not None:
        return {"kind": m.get("kind"), "options": m.get("options", {}), "legacy": False}
    try:
        legacy = json.loads((out / LEGACY_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(legacy, dict) or legacy.get("kind") != "gqaprune-finetune":
        return None
    return {"kind": KIND, "options": legacy.get("options", {}), "legacy": True}


def _legacy_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name in _LEGACY_FILES or _LEGACY_PATTERN.match(p.name))


def foreign(out: Path, record: dict | None) -> list[str]:
    """Entries of ``out`` that gqaprune did not write (all of them when there is no record)."""
    if record is None or not record["legacy"]:
        return foreign_entries(out)
    owned = set(_legacy_entries(out))
    return sorted(p.name for p in out.iterdir() if p.name not in owned)


def _names(entries: list[str], limit: int = 8) -> str:
    return ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


_RULES = {"overwrite": "--overwrite only replaces a folder gqaprune wrote",
          "resume": "resuming writes only into a folder gqaprune wrote"}


def _refuse_foreign(out: Path, record: dict | None, entries: list[str], decision: str) -> None:
    why = (f"it has no {MANIFEST}, so gqaprune did not write it" if record is None
           else "gqaprune did not write these")
    raise GQAPruneError(f"{FLAG} {out}: {_RULES[decision]}, and {why}: {_names(entries)}. Move them away, or "
                        f"choose another {FLAG}.")


# ------------------------------------------------------------------------------ resume
def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None


def resolve_resume(opts) -> str | None:
    """The checkpoint folder to resume from, or None."""
    r = opts.resume_from_checkpoint
    if not r:
        return None
    out = Path(opts.output_dir)
    if r.lower() in ("last", "latest", "true", "auto", "1", "yes"):
        last = last_checkpoint(out)
        if last is None:
            raise GQAPruneError(
                f"--resume_from_checkpoint {r}: no checkpoint-N folder in --output_dir {out}; nothing to resume. "
                "Start without --resume_from_checkpoint, or point at the run's output folder."
            )
        return last
    p = Path(r).expanduser()
    if p.is_dir() and not (p / "trainer_state.json").is_file():
        last = last_checkpoint(p)
        if last is not None:
            return last
    if not (p / "trainer_state.json").is_file():
        raise GQAPruneError(
            f"--resume_from_checkpoint {r}: not a training checkpoint (no trainer_state.json); pass a "
            f"checkpoint-N folder written by a run, or 'last'."
        )
    return str(p)


# ------------------------------------------------------------------------------ the decision
def _inputs(opts, resume: str | None) -> dict[str, Path | None]:
    """The local paths the run reads, by flag; the output must not overlap any of them."""
    from gqaprune.data.instructions import resolve_instruction_source
    from gqaprune.models.io import local_path

    src = resolve_instruction_source(opts.data_path)
    inputs = {"--prune_model": local_path(opts.prune_model), "--distill_from": local_path(opts.distill_from),
              "--data_path": None if src.startswith("hub:") else Path(src)}
    out = Path(opts.output_dir).expanduser().resolve()
    if resume is not None:
        ckpt = Path(resume).expanduser().resolve()
        if ckpt != out and out not in ckpt.parents:   # a checkpoint inside output_dir is the normal case
            inputs["--resume_from_checkpoint"] = ckpt
    return inputs


def plan_run_dir(opts, resume: str | None) -> RunPlan:
    """Decide what to do with output_dir, changing nothing; raise GQAPruneError when it is not safe."""
    out = Path(opts.output_dir)
    check_not_input(out.expanduser(), FLAG, _inputs(opts, resume))
    if out.exists() and not out.is_dir():
        raise GQAPruneError(f"{FLAG} {out}: exists and is not a folder")
    check_writable(out, FLAG)
    step = None
    if resume is not None:
        step = int(json.loads((Path(resume) / "trainer_state.json").read_text()).get("global_step", 0))
    if not out.is_dir() or not any(out.iterdir()):
        return RunPlan(out, "fresh", resume, step)  # (also: resuming from a checkpoint elsewhere into a new folder)
    record = read_run_record(out)
    strangers = foreign(out, record)
    if resume is not None:
        _check_resumable(out, opts, record, strangers)
        return RunPlan(out, "resume", resume, step)
    if opts.overwrite:
        if strangers:
            _refuse_foreign(out, record, strangers, "overwrite")
        return RunPlan(out, "overwrite")
    if record is None:
        raise GQAPruneError(
            f"{FLAG} {out}: the folder is not empty and holds no gqaprune run; choose an empty or new folder "
            f"(--overwrite replaces only a folder gqaprune wrote)."
        )
    _check_kind(out, record, "; choose another --output_dir, or pass --overwrite to replace it")
    diffs = manifest_diff(record["options"], manifest_options(opts), _defaults(opts))
    started = any(out.glob("checkpoint-*")) or (out / SUMMARY).exists()
    if not diffs and not started and not strangers:
        return RunPlan(out, "overwrite")  # the same run stopped before its first checkpoint: nothing to keep
    what = "a different run (" + "; ".join(diffs) + ")" if diffs else "an earlier run with the same options"
    raise GQAPruneError(
        f"{FLAG} {out}: holds {what}. Pass --resume_from_checkpoint last to continue it, --overwrite to "
        "replace it, or choose another --output_dir."
    )


def _check_kind(out: Path, record: dict, advice: str) -> None:
    if record["kind"] != KIND:
        raise GQAPruneError(f"{FLAG} {out}: holds a gqaprune {record['kind']} output, not a fine-tuning run{advice}.")


def _check_resumable(out: Path, opts, record: dict | None, strangers: list[str]) -> None:
    if record is None:
        raise GQAPruneError(
            f"{FLAG} {out}: holds files but no {MANIFEST}, so it is not a gqaprune fine-tuning run that can be "
            f"resumed here ({_names(strangers)}); pass another {FLAG}."
        )
    _check_kind(out, record, f" that can be resumed; pass another {FLAG}")
    if strangers:
        _refuse_foreign(out, record, strangers, "resume")
    diffs = manifest_diff(record["options"], manifest_options(opts), _defaults(opts))
    if diffs and not opts.overwrite:
        raise GQAPruneError(
            f"{FLAG} {out}: holds a different run than the one being resumed; these options differ: "
            + "; ".join(diffs) + ". Resume with the original options, or pass --overwrite to accept the change."
        )


# ------------------------------------------------------------------------------ opening it
def planned_entries(opts, world_size: int) -> list[str]:
    """Top-level names the run writes besides checkpoints and the final adapter: claimed before they exist."""
    names = [METRICS]
    if opts.wandb_project:
        names.append("wandb")
    if opts.tensorboard:
        names.append("tensorboard")
    if opts.log_sample_ids:
        names += [f"samples_rank{r}.txt" for r in range(world_size)]
    return names


def open_run_dir(opts, plan: RunPlan, world_size: int) -> RunFolder:
    """Rank 0: clear a replaced run, trim metrics after the resume point, write the manifest and claims."""
    out = plan.out.expanduser()
    record = read_run_record(out) if out.is_dir() else None
    if out.is_dir() and plan.decision in ("overwrite", "resume"):
        strangers = foreign(out, record)   # checked again right before anything changes
        if strangers:
            _refuse_foreign(out, record, strangers, plan.decision)
    if plan.decision == "overwrite" and out.is_dir():
        for e in out.iterdir():
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
        log.warning("--overwrite: removed the earlier run's files from %s", out)
    out.mkdir(parents=True, exist_ok=True)
    rf = RunFolder.open(out, KIND, "reuse", info={"options": manifest_options(opts)})
    if record is not None and record["legacy"] and plan.decision == "resume":
        rf.add(*_legacy_entries(out))     # an earlier version's run: take over what it wrote
    rf.add(*planned_entries(opts, world_size))
    if plan.decision == "resume" and plan.resume_step is not None:
        trim_after(out / METRICS, plan.resume_step)   # steps after the checkpoint are re-run and logged again
    return rf


__all__ = ["KIND", "LEGACY_MANIFEST", "PLOT", "RESUMABLE_CHANGES", "RunPlan", "SUMMARY", "foreign", "last_checkpoint",
           "manifest_diff", "manifest_options", "open_run_dir", "plan_run_dir", "planned_entries", "read_run_record",
           "resolve_resume"]
