"""Importance criteria: one interface, one registry (as Torch-Pruning's ``pruner/importance.py``).

A criterion is an object with

    name: str                 the --criterion value
    needs_calibration: bool   whether it reads calibration tokens
    __call__(model, layout, ids, ctx) -> [{'kv': tensor(n_kv), 'mlp': tensor(n_mlp)}, ...]   one per layer

where ``ctx`` is a ``ScoreContext`` (seed, batch size, ...). Higher scores are kept. The pruner
looks a criterion up in ``CRITERIA`` and calls it; it never branches on the name.

  taylor, taylor-vector, taylor-second   calibration gradients (taylor.py)
  magnitude, random                      data-free (magnitude.py)
  activation                             calibration activations (activation.py)
  obs                                    greedy structured OBS on calibration activations (obs.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gqaprune.errors import GQAPruneError
from gqaprune.prune.score.activation import Activation
from gqaprune.prune.score.magnitude import Magnitude, Random
from gqaprune.prune.score.obs import OBS
from gqaprune.prune.score.taylor import TAYLOR, TAYLOR_SECOND, TAYLOR_VECTOR


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may need besides the model and the calibration ids."""

    seed: int = 0                        # the random criterion's seed
    batch_size: int = 8                  # calibration samples per forward (and backward) pass
    hooks: bool = True                   # gradient criteria: fold each gradient as it arrives (False: after backward)
    gradient_checkpointing: bool = True  # gradient criteria: recompute activations in backward
    progress: bool = True


class Criterion(Protocol):
    name: str
    needs_calibration: bool

    def __call__(self, model, layout, ids, ctx: ScoreContext) -> list[dict]: ...


CRITERIA: dict[str, Criterion] = {c.name: c for c in (TAYLOR, TAYLOR_VECTOR, TAYLOR_SECOND, Magnitude(),
                                                      Activation(), Random(), OBS())}


def criterion(name: str) -> Criterion:
    """The registered criterion ``name``; a message listing the choices when there is none."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise GQAPruneError(f"--criterion {name}: unknown; choose one of {', '.join(CRITERIA)}") from None


def score_units(model, layout, name: str, ids=None, *, seed: int = 0, batch_size: int = 8, hooks: bool = True,
                gradient_checkpointing: bool = True, progress: bool = True) -> list[dict]:
    """Scores of criterion ``name`` for every layer (the registry's one entry point); ``ids``: calibration
    token ids (samples x tokens), needed by the criteria that read calibration data."""
    c = criterion(name)
    if c.needs_calibration and ids is None:
        raise GQAPruneError(f"--criterion {name} needs calibration tokens")
    return c(model, layout, ids, ScoreContext(seed, batch_size, hooks, gradient_checkpointing, progress))
