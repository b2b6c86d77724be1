"""PEFT: wrap a model in LoRA without the deprecation warning PEFT triggers in transformers 5.x.

Targets peft 0.17-0.21: ``get_peft_model`` reads ``model.is_gradient_checkpointing``, which
transformers 5.x deprecates (renamed ``is_activation_checkpointing``) with a FutureWarning
on every fine-tuning run. The warning is filtered for that one call only; without it every run
prints a deprecation warning the user can do nothing about.
"""

from __future__ import annotations

import warnings

TARGET = "peft>=0.17 (get_peft_model reads is_gradient_checkpointing)"


def get_peft_model(model, config):
    from peft import get_peft_model as _get

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _get(model, config)
