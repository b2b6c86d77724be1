"""lm-evaluation-harness: silence its noise that says nothing about the user's run, for one block.

Targets lm-eval 0.4.x (written against 0.4.13):
* ``lm_eval.evaluator.get_git_commit_hash`` runs ``git describe`` and lets git print
  "fatal: not a git repository" to the terminal outside a repository; replaced for the
  block by a quiet lookup with the same result.
* Warnings about how gqaprune hands it a model (an initialised model as ``pretrained``) and
  about stock task YAMLs that leave a metric's aggregation to lm-eval's default are
  filtered from its loggers.
Without this, ``gqaprune eval`` prints a git error and a dozen warnings per task.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator

TARGET = "lm-eval>=0.4,<0.5 (evaluator.get_git_commit_hash)"

EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`",
                     "Passed an already-initialized model through `pretrained`",
                     "is defined, but aggregation is not", "is defined, but higher_is_better is not")
LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task")


def _keep(record) -> bool:
    msg = str(record.msg)
    return not any(w in msg for w in EXPECTED_WARNINGS)


def quiet_git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import lm_eval.evaluator as ev

    loggers = [logging.getLogger(n) for n in LOGGERS]
    for lg in loggers:
        lg.addFilter(_keep)
    orig = getattr(ev, "get_git_commit_hash", None)
    if orig is not None:
        ev.get_git_commit_hash = quiet_git_hash
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(_keep)
        if orig is not None:
            ev.get_git_commit_hash = orig
