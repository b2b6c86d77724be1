"""gqaprune.compat.transformers: the names and private Trainer hooks it relies on still exist and work."""

from __future__ import annotations

import torch

from helpers import make_tiny_model
from gqaprune.compat import transformers as tc


def test_checkpointing_can_be_switched_on_and_off():
    m = make_tiny_model()
    assert not tc.checkpointing_enabled(m)
    assert tc.enable_checkpointing(m) and tc.checkpointing_enabled(m)
    tc.disable_checkpointing(m)
    assert not tc.checkpointing_enabled(m)


def test_training_argument_names_exist_in_this_version(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             **tc.checkpointing_args(True), **tc.sampler_args(True))
    key = next(iter(tc.checkpointing_args(True)))
    assert getattr(args, key) is True


def test_cache_helpers_drive_an_incremental_decode():
    m = make_tiny_model()
    cache, kw = tc.new_cache(m), tc.cache_kwarg(m)
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        full = m(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, -1]
        m(input_ids=x, use_cache=True, **{kw: cache})
        step = m(input_ids=torch.tensor([[8]]), use_cache=True, **{kw: cache}).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_trainer_mixins_patch_methods_that_exist(tmp_path):
    """The mixins override private Trainer methods: fail loudly when a transformers release drops them."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    assert hasattr(Trainer, "_get_eval_sampler") and hasattr(Trainer, "_save_checkpoint")

    class T(tc.SequentialEvalSampler, tc.TimedCheckpointSave, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **tc.sampler_args(True))
    t = T(model=make_tiny_model(), args=args)
    data = [{"input_ids": torch.arange(i + 2)} for i in range(6)]
    # stock 5.x would group evaluation batches by length here; the mixin keeps dataset order
    assert isinstance(t._get_eval_sampler(data), SequentialSampler)
    saved = getattr(args, next(iter(tc.sampler_args(True))))
    assert saved in ("group_by_length", True)   # and it did not touch the arguments
