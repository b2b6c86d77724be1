"""transformers: the names and private hooks gqaprune depends on, in one place.

Targets transformers 5.x (written against 5.24; ``pyproject.toml`` pins ``>=5.0,<6``).
Each entry says what it covers and what breaks without it; tests/compat/test_transformers.py
checks that the names it relies on still exist.

* **Activation checkpointing names.** 5.x renamed gradient checkpointing to activation
  checkpointing (``activation_checkpointing_enable``, the ``TrainingArguments`` field
  ``activation_checkpointing``) and deprecates the old names with a warning; 4.x has only
  the old ones. Without this, calibration and fine-tuning would warn or fail on one of them.
* **Length-grouped sampler.** 5.x replaced ``group_by_length=True`` with
  ``train_sampling_strategy="group_by_length"``.
* **KV cache argument.** 5.24 renamed ``past_key_values`` to ``cache`` in ``forward``.
* **``SequentialEvalSampler``** overrides the private ``Trainer._get_eval_sampler``: stock
  5.x groups *evaluation* batches by length too when the training sampler does, so the
  validation loss (a mean of per-batch means) would change with ``--group_by_length``
  and not be comparable across runs.
* **``TimedCheckpointSave``** wraps the private ``Trainer._save_checkpoint`` to time it:
  without it, checkpoint saves would count as training time in tokens/s.
"""

from __future__ import annotations

import dataclasses
import inspect
import time

TARGET = "transformers>=5.0,<6 (written against 5.24)"


# ------------------------------------------------------------------ activation checkpointing
def checkpointing_enabled(model) -> bool:
    """Whether the model checkpoints activations now (reading the 5.x name first: the old one warns)."""
    attr = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, attr, False))


def enable_checkpointing(model) -> bool:
    """Turn on non-reentrant activation checkpointing; False where the model cannot."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        return False
    key = "activation_checkpointing_kwargs" if "activation" in enable.__name__ else "gradient_checkpointing_kwargs"
    enable(**{key: {"use_reentrant": False}})
    return True


def disable_checkpointing(model) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or \
        getattr(model, "gradient_checkpointing_disable", None)
    if disable is not None:
        disable()


def _training_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def checkpointing_args(on: bool) -> dict:
    """TrainingArguments for activation checkpointing, under this version's field name.

    Non-reentrant checkpointing works with frozen base weights (no ``enable_input_require_grads``).
    """
    key = "activation_checkpointing" if "activation_checkpointing" in _training_fields() else \
        "gradient_checkpointing"
    return {key: on, key + "_kwargs": {"use_reentrant": False} if on else None}


def sampler_args(group_by_length: bool) -> dict:
    """TrainingArguments for the length-grouped training sampler."""
    if "train_sampling_strategy" in _training_fields():
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


# ------------------------------------------------------------------ KV cache
def new_cache(model):
    """An empty DynamicCache for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # before 4.56: no config argument
        return DynamicCache()


def cache_kwarg(model) -> str:
    """The ``forward`` keyword that takes the KV cache (``cache`` from 5.24, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ------------------------------------------------------------------ Trainer private hooks
class SequentialEvalSampler:
    """Trainer mixin: evaluation batches in dataset order, whatever the training sampler (see module doc)."""

    def _get_eval_sampler(self, eval_dataset):
        from torch.utils.data import SequentialSampler
        from transformers.trainer_utils import has_length

        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None   # as stock 5.x does


class TimedCheckpointSave:
    """Trainer mixin: adds the time spent saving checkpoints to ``self.side_seconds`` (see module doc)."""

    side_seconds: float = 0.0

    def _save_checkpoint(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return super()._save_checkpoint(*a, **kw)
        finally:
            self.side_seconds += time.perf_counter() - t0
