"""The transformers Trainer as fine-tuning uses it: the LoRA trainer (distillation, packed batches,
extra-corpus perplexity, token counts, NaN stop), its callbacks, its arguments, the precision
plan, the fused-kernel plan and the graceful Ctrl-C stop.

The private Trainer hooks this relies on live in ``gqaprune.compat.transformers`` (the
sequential evaluation sampler and the timed checkpoint save), each with the version it
targets and what breaks without it.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gqaprune.compat import liger
from gqaprune.compat.transformers import SequentialEvalSampler, TimedCheckpointSave, checkpointing_args, sampler_args
from gqaprune.errors import GQAPruneError
from gqaprune.recover.distill import distillation_kl, kl_sum
from gqaprune.recover.metrics import rename_metric, to_float

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The loss of optimizer step ``step`` was NaN/inf; raised before the optimizer applies it."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss {loss} at optimizer step {step}")
        self.step, self.loss = step, loss


class LoRATrainer(SequentialEvalSampler, TimedCheckpointSave, Trainer):
    """Adds extra-corpus PPL to each evaluation, counts real tokens, distils from a teacher, stops on NaN/inf.

    ``teacher``: frozen model for distillation (None: plain LM loss), weighted by
    ``distill_alpha`` at temperature ``distill_temperature``. ``ppl_tracker``: extra corpora
    scored at each evaluation (rank 0). ``eval_collator``: the collator for evaluation
    batches (packed training still evaluates padded batches, so the val loss stays comparable).
    """

    def __init__(self, *args, teacher=None, distill_alpha: float = 0.5, distill_temperature: float = 2.0,
                 ppl_tracker=None, eval_collator=None, **kwargs):
        self.teacher = teacher
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature
        self.ppl_tracker = ppl_tracker
        self.eval_collator = eval_collator
        self.tokens_seen = 0         # real (non-pad) tokens fed forward in training, this process
        self.positions_seen = 0      # all positions fed forward in training, padding included
        self.side_seconds = 0.0      # seconds in evaluation and checkpoint saving, kept out of tokens/s
        self._distill_sums = None    # [KL sum, LM-loss sum, tokens] since the last log (this process)
        self.last_distill: dict | None = None
        super().__init__(*args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _loss_scale(self, num_items_in_batch) -> int:
        """The factor the Trainer applies to a loss normalised by num_items_in_batch (tokens averaged
        across processes); mirrored for the terms computed here."""
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.model_accepts_loss_kwargs):
            return self.accelerator.num_processes // (self.get_tp_size() if hasattr(self, "get_tp_size") else 1)
        return 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Plain LM loss; in training with a teacher: alpha * T^2 * KL + (1 - alpha) * LM loss.

        Both terms are normalised alike: summed over the loss tokens and divided by the
        Trainer's token count for the whole optimizer step (``num_items_in_batch``), or
        by this micro-batch's token count when the Trainer gives none. Evaluation (model
        not training) always reports the plain LM loss.

        Packed batches (one row with position_ids) compute output logits only at the
        positions whose next token is in the loss (``logits_to_keep``), for student and
        teacher: the same loss terms, without the vocabulary projection of prompt tokens.
        """
        packed = "position_ids" in inputs and inputs["input_ids"].shape[0] == 1 and "labels" in inputs
        distil = self.teacher is not None and model.training
        if not packed and not distil:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scale = self._loss_scale(num_items_in_batch)
        idx = s_logits = None
        if packed:
            ce, outputs, s_logits, idx, n = self._packed_lm_loss(model, inputs, num_items_in_batch, scale)
            if not distil:
                return (ce, outputs) if return_outputs else ce
        else:
            ce, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        t_logits = self._teacher_logits(inputs, idx)
        if packed:
            kl_total = kl_sum(s_logits, t_logits, self.distill_temperature)
        else:
            kl_total, n = distillation_kl(outputs.logits, t_logits, inputs["labels"], self.distill_temperature)
        del t_logits
        denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
        kl = kl_total / denom * scale
        a, t2 = self.distill_alpha, self.distill_temperature ** 2
        loss = (1.0 - a) * ce + a * t2 * kl
        sums = self._distill_sums if self._distill_sums is not None else [0.0, 0.0, 0]
        d = float(denom) / scale   # back from a per-token mean to a sum over this micro-batch's tokens
        sums[0] += float(kl_total.detach())
        sums[1] += float(ce.detach()) * d
        sums[2] += n
        self._distill_sums = sums
        return (loss, outputs) if return_outputs else loss

    def _packed_lm_loss(self, model, inputs, num_items_in_batch, scale):
        """(LM loss, outputs, student logits ``[n, vocab]``, loss positions ``[n]``, n) of a packed ``[1, tokens]``
        row; the logits are computed at the n loss positions only."""
        labels = inputs["labels"]
        keep = labels[0, 1:] != -100
        idx = keep.nonzero()[:, 0]
        n = int(idx.numel())
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**fwd, logits_to_keep=idx, use_cache=False)
        s_logits = outputs.logits[0]
        denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
        ce = torch.nn.functional.cross_entropy(s_logits.float(), labels[0, 1:][keep], reduction="sum")
        return ce / denom * scale, outputs, s_logits, idx, n

    def _teacher_logits(self, inputs, idx) -> torch.Tensor:
        # per micro-batch, no graph, no logit cache: teacher memory = one forward's activations
        t_in = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        with torch.no_grad():
            if idx is not None:
                return self.teacher(**t_in, logits_to_keep=idx, use_cache=False).logits[0]
            return self.teacher(**t_in, use_cache=False).logits

    def log(self, logs, *args, **kwargs):
        # x axis of PPL-against-training-tokens curves: real tokens this process has trained on since the run
        # began, resumptions included (kept in the checkpoint's trainer state; see training_step)
        logs.setdefault("train_tokens_seen", self.state.num_input_tokens_seen)
        if "loss" in logs and self._distill_sums is not None and self._distill_sums[2] > 0:
            kl_total, ce_total, n = self._distill_sums
            logs["distill_kl"] = kl_total / n    # KL(teacher || student) at temperature T, per token
            logs["distill_ce"] = ce_total / n    # the plain LM loss, per token
            self.last_distill = {"kl": logs["distill_kl"], "ce": logs["distill_ce"]}
            self._distill_sums = None
        return super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        t0 = time.perf_counter()
        try:
            return self._evaluate_with_ppl(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self.side_seconds += time.perf_counter() - t0

    def _evaluate_with_ppl(self, eval_dataset, ignore_keys, metric_key_prefix):
        metrics = {}
        if self.eval_dataset is not None or eval_dataset is not None:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.ppl_tracker is not None and self.is_world_process_zero():
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            with torch.no_grad():
                res = self.ppl_tracker.evaluate(model)
            model.train(was_training)
            ppl = {f"{metric_key_prefix}_{k}_ppl": r.ppl for k, r in res.items()}
            self.log(ppl)
            metrics.update(ppl)
        return metrics

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs["input_ids"]
        self.positions_seen += ids.numel()
        # packed batches have no padding and no attention mask
        n = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
        self.tokens_seen += n          # this invocation: the throughput's numerator
        # since the run began: TrainerState saves it in every checkpoint and restores it on resume. The field is
        # transformers' own, filled by it only under include_num_input_tokens_seen, which gqaprune leaves "no"
        # (its non-padding count compares ids with pad_token_id, wrong for packed rows that hold that id).
        self.state.num_input_tokens_seen += n
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device)
        if self.args.world_size > 1:
            # Every process must stop together, or the others hang in the next all-reduce.
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise Diverged(self.state.global_step + 1, float(loss.detach().float().cpu()))
        return loss


# ------------------------------------------------------------------------------ callbacks
class MetricsCallback(TrainerCallback):
    """Every Trainer log -> one metrics.jsonl line (renamed), PPL values with their protocol."""

    def __init__(self, sink, tracker=None):
        self.sink, self.tracker = sink, tracker

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        rec = {}
        for k, v in logs.items():
            if k in ("epoch", "step"):
                continue
            f = to_float(v)
            rec[rename_metric(k)] = f if f is not None else v
            if k.endswith("_ppl") and self.tracker is not None:
                key = k[len("eval_"):-len("_ppl")] if k.startswith("eval_") else None
                res = self.tracker.latest.get(key)
                if res is not None:
                    proto = res.to_dict()
                    proto.pop("ppl", None)
                    proto.pop("nll", None)
                    rec[rename_metric(k) + "_protocol"] = proto
        self.sink.write(state.global_step, rec, logs.get("epoch", state.epoch))


class EvalEvery(TrainerCallback):
    """Evaluate every ``every`` optimizer steps (val loss and/or extra PPL); 0 = never during training."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kw):
        if self.every > 0 and state.global_step % self.every == 0:
            control.should_evaluate = True
        return control


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar, with the latest loss/PPL as its postfix instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            post = {k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)
                    and (k in ("loss", "eval_loss", "learning_rate") or k.endswith("_ppl"))}
            if post:
                self.training_bar.set_postfix(post, refresh=False)


class ClaimCheckpoints(TrainerCallback):
    """Claims each ``checkpoint-N`` folder in the run folder's manifest *before* the Trainer writes it.

    Added last, so ``on_step_end`` sees every callback's ``should_save``; the Trainer saves
    after ``on_step_end``, so a run killed during the save still leaves a folder gqaprune
    recognises as its own. ``on_save`` claims again for a save requested later than that.
    """

    def __init__(self, claim):
        self.claim = claim

    def _claim(self, state) -> None:
        if state.is_world_process_zero:
            self.claim(f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_step_end(self, args, state, control, **kw):
        if control.should_save:
            self._claim(state)

    def on_save(self, args, state, control, **kw):
        self._claim(state)


class GracefulStop(TrainerCallback):
    """The first Ctrl-C becomes "save a checkpoint after this optimizer step, then stop", so nothing since
    the last ``--save_steps`` checkpoint is lost; a second Ctrl-C stops at once. Single process only
    (under torchrun every rank gets the signal at a different point)."""

    def __init__(self):
        self.requested, self._prev = False, None

    def install(self) -> None:
        self._prev = signal.signal(signal.SIGINT, self._on_sigint)

    def uninstall(self) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
            self._prev = None

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: saving a checkpoint after this optimizer step, then stopping "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kw):
        if self.requested:
            control.should_save, control.should_training_stop = True, True
        return control


# ------------------------------------------------------------------------------ plans and arguments
def precision(opts, device: torch.device) -> tuple[torch.dtype, str, bool, bool]:
    """(load dtype, description, Trainer bf16, Trainer fp16).

    LoRA keeps the frozen base in the half type; ``--full_finetune`` trains every weight, so the weights
    stay fp32 (the optimizer's master copy) and only the autocast is half precision."""
    full = bool(getattr(opts, "full_finetune", False))
    if opts.fp16:
        if device.type != "cuda":
            raise GQAPruneError("--fp16: fp16 mixed precision needs a CUDA GPU; leave it out (fp32) on this device")
        if full:
            return torch.float32, "fp32 weights + fp16 autocast (asked for with --fp16)", False, True
        return torch.float16, "fp16 base weights + fp16 autocast (asked for with --fp16)", False, True
    bf16 = opts.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise GQAPruneError("--bf16: this GPU does not support bf16; leave it out to train in fp32")
        if full:
            return torch.float32, "fp32 weights + bf16 autocast", True, False
        return torch.bfloat16, "bf16 base weights + bf16 autocast, fp32 LoRA weights", True, False
    return torch.float32, "fp32", False, False


def fused_kernel_plan(want: bool | None, device: torch.device) -> tuple[bool, str]:
    """(apply Liger kernels?, what to report). ``want``: True = required, False = off, None = where available."""
    if want is False:
        return False, "off (--no-fused-kernels)"
    installed = liger.available()
    if not installed or device.type != "cuda":
        why = "liger-kernel is not installed" if not installed else f"Liger kernels need CUDA, training on {device}"
        if want:
            raise GQAPruneError(f"--fused_kernels: {why}; leave the flag out (or pip install liger-kernel on a "
                                "CUDA machine).")
        return False, f"none ({why})"
    return True, "liger"


def apply_fused_kernels(model, *, distill: bool) -> str:
    """Patch the (unwrapped) model with Liger kernels; returns what was applied and what failed."""
    try:
        return liger.apply(model, distill=distill)
    except ImportError as e:   # installed but unimportable (e.g. a Triton mismatch): an optional speed-up
        desc = f"none (Liger failed: {type(e).__name__}: {e})"
        log.warning("fused kernels: %s", desc)
        return desc


def training_arguments(opts, *, accum: int, device: torch.device, gc: bool, bf16: bool, fp16: bool,
                       rank: int) -> TrainingArguments:
    """The Trainer's arguments: our schedule and batch sizes; evaluation and logging are driven by our callbacks."""
    return TrainingArguments(
        output_dir=str(opts.output_dir),
        per_device_train_batch_size=opts.micro_batch_size,
        per_device_eval_batch_size=opts.micro_batch_size,
        gradient_accumulation_steps=accum,
        num_train_epochs=opts.num_epochs,
        max_steps=opts.max_steps if opts.max_steps is not None else -1,
        learning_rate=opts.learning_rate,
        warmup_steps=opts.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        bf16=bf16,
        fp16=fp16,
        **checkpointing_args(gc),
        **sampler_args(opts.group_by_length),
        logging_steps=opts.logging_steps,
        logging_nan_inf_filter=False,      # we stop on NaN instead of hiding it
        eval_strategy="no",                # EvalEvery triggers evaluation, with or without a val split
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        report_to="none",                  # MetricsSink logs metrics.jsonl / W&B / TensorBoard itself
        include_num_input_tokens_seen="no",  # LoRATrainer.training_step keeps state.num_input_tokens_seen
        seed=opts.seed,
        data_seed=opts.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        disable_tqdm=rank != 0,
    )


__all__ = ["ClaimCheckpoints", "Diverged", "EvalEvery", "GracefulStop", "LoRATrainer", "MetricsCallback",
           "QuietProgress", "apply_fused_kernels", "fused_kernel_plan", "precision", "training_arguments"]
