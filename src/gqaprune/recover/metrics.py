"""Where a fine-tuning run's numbers go: ``metrics.jsonl`` always, W&B and TensorBoard when asked,
plus the extra-corpus perplexity tracker and readers of an earlier run's metrics.

metrics.jsonl holds one JSON object per line: ``step`` (optimizer step), ``epoch`` when
known, the metrics under the names ``rename_metric`` gives them (``train/loss``,
``eval/loss``, ``eval/<corpus>_ppl`` with its ``_protocol``, ``learning_rate``, ...), and
``time`` (Unix seconds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


def to_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


_RENAMES = {"loss": "train/loss", "learning_rate": "learning_rate", "grad_norm": "train/grad_norm",
            "distill_kl": "train/distill_kl", "distill_ce": "train/lm_loss", "train_loss": "train/mean_loss"}


def rename_metric(k: str) -> str:
    """The Trainer's log key -> the metrics.jsonl name."""
    if k in _RENAMES:
        return _RENAMES[k]
    if k.startswith("eval_"):
        return "eval/" + k[5:]
    if k.startswith("train_"):
        return "train/" + k[6:]
    return k


class MetricsSink:
    """metrics.jsonl always; W&B and TensorBoard when asked. Rank 0 only (``enabled``)."""

    def __init__(self, out_dir: Path, opts, enabled: bool):
        self.path = out_dir / METRICS
        self.enabled = enabled
        self.wandb_run = None
        self.tb = None
        if not enabled:
            return
        if opts.wandb_project:
            self.wandb_run = init_wandb(opts, out_dir)
        if opts.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError as e:
                log.warning("TensorBoard logging asked for but unavailable (%s); pip install tensorboard", e)

    def write(self, step: int, metrics: dict[str, Any], epoch: float | None = None) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step)}
        if epoch is not None:
            rec["epoch"] = round(float(epoch), 4)
        rec.update(metrics)
        rec["time"] = round(time.time(), 3)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if self.wandb_run is not None and scalars:
            try:
                self.wandb_run.log(scalars, step=int(step))
            except Exception as e:  # noqa: BLE001 - a logging backend must not kill training
                log.warning("W&B log failed (%s); continuing without W&B", e)
                self.wandb_run = None
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, int(step))
            self.tb.flush()

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:  # noqa: BLE001 - a logging backend must not lose the run
                log.warning("W&B finish failed: %s", e)
            self.wandb_run = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode() -> str | None:
    """``"offline"`` when the user set no WANDB_MODE and no API key is found; else None (wandb decides).

    Passed to ``wandb.init(mode=...)`` for this run only: the process environment is not changed.
    """
    if not os.environ.get("WANDB_MODE") and not _wandb_has_key():
        return "offline"
    return None


def init_wandb(opts, out_dir: Path):
    """A W&B run logging into ``out_dir/wandb``, or None when wandb is missing or cannot start."""
    try:
        import wandb
    except ImportError:
        log.warning("--wandb_project given but wandb is not installed; logging to %s only (pip install wandb)",
                    out_dir / METRICS)
        return None
    mode = wandb_mode()
    if mode == "offline":
        log.warning("W&B: no API key found; logging offline to %s/wandb (upload later with `wandb sync`)", out_dir)
    try:
        return wandb.init(project=opts.wandb_project, dir=str(out_dir), config=asdict(opts),
                          name=Path(opts.output_dir).name, job_type="lora-finetune", mode=mode)
    except Exception as e:  # noqa: BLE001 - network/auth problems must not stop training
        log.warning("W&B init failed (%s: %s); logging to %s only", type(e).__name__, e, out_dir / METRICS)
        return None


class PPLTracker:
    """Pre-tokenised extra val corpora and the latest (and first) PPLResult of each."""

    def __init__(self, corpora: dict[str, str], tokenizer, opts):
        from gqaprune.data.corpora import load_text_corpus
        from gqaprune.evaluate.perplexity import tokenize_corpus

        self.corpora, self.tokenizer = corpora, tokenizer
        self.seq_len, self.max_tokens = opts.ppl_seq_len, opts.extra_val_max_tokens
        # c4 has no test split; the others are scored on test, as the protocol states.
        self.splits = {k: "validation" if k == "c4" else "test" for k in corpora}
        self.ids = {k: tokenize_corpus(tokenizer, load_text_corpus(name, self.splits[k]).text)
                    for k, name in corpora.items()}
        self.latest: dict[str, Any] = {}
        self.first: dict[str, Any] = {}

    def evaluate(self, model) -> dict[str, Any]:
        from gqaprune.evaluate.perplexity import perplexity

        out = {}
        for key, name in self.corpora.items():
            res = perplexity(model, self.tokenizer, name, seq_len=self.seq_len, max_tokens=self.max_tokens,
                             batch_size=8, progress=False, ids=self.ids[key], split=self.splits[key])
            out[key] = res
            self.latest[key] = res
            self.first.setdefault(key, res)
        return out


# ------------------------------------------------------------------------------ an earlier run's metrics
def _records(metrics_path: Path) -> list[dict]:
    if not metrics_path.is_file():
        return []
    return [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]


def ppl_at_step0(metrics_path: Path) -> dict[str, dict]:
    """PPL before fine-tuning, from a resumed run's metrics.jsonl (its step-0 evaluation)."""
    out = {}
    for r in _records(metrics_path):
        if r.get("step") != 0:
            continue
        for k, v in r.items():
            if k.startswith("eval/") and k.endswith("_ppl") and k + "_protocol" in r:
                out[k[5:-4]] = dict(r[k + "_protocol"], ppl=v)
    return out


def best_eval_from_metrics(metrics_path: Path) -> float | None:
    vals = [r.get("eval/loss") for r in _records(metrics_path)]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return min(vals) if vals else None


def trim_after(metrics_path: Path, step: int) -> None:
    """Drop the lines logged after optimizer step ``step`` (a resumed run logs those steps again)."""
    if not metrics_path.is_file():
        return
    keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    metrics_path.write_text("".join(ln + "\n" for ln in keep))


__all__ = ["METRICS", "MetricsSink", "PPLTracker", "best_eval_from_metrics", "init_wandb", "ppl_at_step0",
           "rename_metric", "to_float", "trim_after", "wandb_mode"]
