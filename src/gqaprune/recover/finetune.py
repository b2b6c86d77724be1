"""LoRA recovery fine-tuning of a pruned model: PEFT LoRA + the transformers Trainer.

``finetune(FinetuneOptions(...))`` is the whole run, in phases (litgpt's ``finetune/lora.py``):

  plan_run          every check that needs no model, changing nothing: options against the
                    world size, the output folder and its inputs (run_dir), model references
  load_data         the instruction data (its errors come before the model is loaded)
  setup_training    device, precision, TrainingArguments
  load_student      the pruned model and tokenizer, the teacher, fused kernels
  build_datasets    tokenised train/val splits (cached), extra perplexity corpora
  build_trainer     opens the run folder (only now does it change), wraps LoRA, the Trainer
  train             step-0 evaluation, training, the final evaluation; Ctrl-C and NaN stops
  write_outputs     adapter, tokenizer, summary, plot

It trains data-parallel when launched by ``torchrun`` / ``accelerate launch`` and leaves in
``output_dir``: the adapter (PEFT ``save_pretrained``), ``checkpoint-N/`` folders for
``--resume_from_checkpoint``, ``metrics.jsonl``, ``training_curves.png``,
``finetune_summary.json`` and gqaprune's manifest (the options, and every entry the run wrote).

Option names are the seed guide's ``post_training.py`` flags (LLM-Pruner / alpaca-lora),
so its command lines run unchanged through ``scripts/post_training.py``.

Recovery options beyond the guide's: ``--distill_from`` (knowledge distillation from the
dense model, teacher run per micro-batch without gradients), and for throughput
``--group_by_length``, ``--packing`` (padding-free micro-batches with per-example
attention) and Liger fused kernels where installed. None of the throughput options
changes which examples make up an optimizer step except ``--group_by_length``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from gqaprune.data.collate import PadCollator
from gqaprune.data.instructions import load_instruction_records
from gqaprune.data.tokenized import TokenizedSplit, check_val_split, prepare_data
from gqaprune.errors import GQAPruneError, Interrupted
from gqaprune.models.adapters import ADAPTER_INFO, base_fingerprint
from gqaprune.models.io import load_model, resolve_device, resolve_model_ref
from gqaprune.outputs import RunFolder, atomic_write
from gqaprune.recover.distill import load_teacher
from gqaprune.recover.lora import check_target_modules, family_targets, full_parameters, wrap_lora
from gqaprune.recover.metrics import METRICS, MetricsSink, PPLTracker, best_eval_from_metrics, ppl_at_step0
from gqaprune.recover.options import FinetuneOptions, check_extra_val
from gqaprune.recover.run_dir import (PLOT, SUMMARY, RunPlan, last_checkpoint, open_run_dir, plan_run_dir,
                                      resolve_resume)
from gqaprune.recover.trainer import (ClaimCheckpoints, Diverged, EvalEvery, GracefulStop, LoRATrainer, MetricsCallback,
                                      QuietProgress, apply_fused_kernels, fused_kernel_plan, precision,
                                      training_arguments)
from gqaprune.report import plot_curves

log = logging.getLogger(__name__)

# What PEFT's and the tokenizer's save_pretrained write at the top of output_dir (claimed before they exist).
_ADAPTER_FILES = (ADAPTER_INFO, "adapter_config.json", "adapter_model.safetensors", "README.md")
FULL_MODEL_DIR = "model"   # --full_finetune: the trained model's checkpoint, inside output_dir
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class FinetuneResult:
    """What a fine-tuning run did; also written to ``output_dir/finetune_summary.json``."""

    output_dir: str
    adapter_dir: str
    status: str                      # completed | diverged
    global_step: int
    epoch: float
    world_size: int
    grad_accum: int
    precision: str
    gradient_checkpointing: bool
    train_examples: int
    val_examples: int
    train_tokens: int                # non-pad tokens fed forward by all processes in this invocation
    train_seconds: float             # training loop time, evaluations and checkpoint saves excluded
    tokens_per_second: float         # train_tokens / train_seconds
    wall_seconds: float              # the whole run, from the first evaluation to the end
    final_train_loss: float | None
    best_eval_loss: float | None
    ppl_before: dict[str, dict] = field(default_factory=dict)   # name -> PPLResult.to_dict()
    ppl_after: dict[str, dict] = field(default_factory=dict)
    dataset_cache: str = "off"       # off | hit | miss
    resumed_from: str | None = None
    metrics_path: str = ""
    plot_path: str | None = None
    message: str = ""
    batching: str = "padded"         # padded | length-grouped | packed | length-grouped + packed
    padding_fraction: float = 0.0    # pad positions / all positions fed forward (0 when packed)
    fused_kernels: str = "none"      # what fused kernels were applied, or why none
    distill: dict | None = None      # teacher, alpha, temperature, final KL / LM-loss terms
    method: str = "lora"             # lora | full (--full_finetune: every weight trained)
    checkpoint_dir: str = ""         # --full_finetune: the trained model's checkpoint folder (output_dir/model)

    def lines(self) -> list[str]:
        """A one-screen summary for the CLI."""
        out = [
            f"{'Full' if self.method == 'full' else 'LoRA'} fine-tuning {self.status}: {self.global_step} optimizer "
            f"steps ({self.epoch:.2f} epochs), "
            f"{self.world_size} process(es), grad accumulation {self.grad_accum}, {self.precision}, gradient "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}",
            f"  data: {self.train_examples:,} train / {self.val_examples:,} val examples; tokenised cache: "
            f"{self.dataset_cache}" + (f"; resumed from {self.resumed_from}" if self.resumed_from else ""),
            f"  throughput: {self.train_tokens:,} non-pad tokens in {self.train_seconds:.1f} s of training = "
            f"{self.tokens_per_second:,.0f} tokens/s (run wall time {self.wall_seconds:.1f} s)",
            f"  batching: {self.batching} ({100 * self.padding_fraction:.1f}% of positions were padding); fused "
            f"kernels: {self.fused_kernels}",
        ]
        if self.distill:
            d = self.distill
            out.append(f"  distillation from {d['teacher']}: alpha {d['alpha']}, temperature {d['temperature']} "
                       f"(loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM loss)"
                       + (f"; last logged KL {d['last_kl']:.4f}, LM loss {d['last_ce']:.4f} per token"
                          if d.get("last_kl") is not None else ""))
        if self.final_train_loss is not None:
            out.append(f"  final train loss {self.final_train_loss:.4f}")
        if self.best_eval_loss is not None:
            out.append(f"  best val loss {self.best_eval_loss:.4f}")
        for name in sorted(set(self.ppl_before) | set(self.ppl_after)):
            b, a = self.ppl_before.get(name), self.ppl_after.get(name)
            proto = a or b
            desc = (f"{proto['dataset']} {proto['split']}, window {proto['seq_len']}, stride {proto['stride']}, "
                    f"{proto['n_tokens']:,} tokens")
            out.append(f"  PPL {name}: before {b['ppl']:.3f}" if b else f"  PPL {name}: before n/a")
            out[-1] += (f" -> after {a['ppl']:.3f}" if a else " -> after n/a") + f" ({desc})"
        out.append(f"  model checkpoint: {self.checkpoint_dir}" if self.method == "full" else
                   f"  adapter: {self.adapter_dir}")
        out.append(f"  metrics: {self.metrics_path}" + (f"; plot: {self.plot_path}" if self.plot_path else ""))
        if self.message:
            out.append(f"  {self.message}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingDivergedError(GQAPruneError):
    """The loss became NaN/inf; training stopped before the optimizer applied it."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


# ------------------------------------------------------------------------------ what the phases hand on
@dataclass
class Setup:
    """This process's place in the run and what it trains with."""

    world_size: int
    rank: int
    accum: int                  # micro-batches per process per optimizer step
    device: torch.device
    dtype: torch.dtype          # the base weights' dtype
    precision: str              # described for the summary
    gc: bool                    # activation checkpointing
    args: Any                   # transformers.TrainingArguments

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0


@dataclass
class Student:
    model: Any
    tokenizer: Any
    teacher: Any = None
    fused: str = "none"         # what fused kernels were applied, or why none


@dataclass
class Datasets:
    train: TokenizedSplit
    val: TokenizedSplit | None
    cache_status: str           # off | hit | miss
    tracker: PPLTracker | None  # extra perplexity corpora (rank 0 only)
    eval_enabled: bool          # a val split or extra corpora to evaluate


@dataclass
class Run:
    trainer: LoRATrainer
    sink: MetricsSink
    folder: RunFolder | None    # rank 0 only
    fingerprint: dict           # the base's, recorded beside the adapter
    stopper: GracefulStop | None = None   # single process only


@dataclass
class Outcome:
    status: str = "completed"
    message: str = ""
    diverged: Diverged | None = None
    wall_seconds: float = 0.0
    run_seconds: float = 1e-9   # training loop only: evaluations and checkpoint saves inside it subtracted
    tokens_seen: int = 0        # non-pad tokens, all processes


# ------------------------------------------------------------------------------ the phases
def _world() -> tuple[int, int, int]:
    """(world size, global rank, local rank) from the torchrun / accelerate environment."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def plan_run(opts: FinetuneOptions, world_size: int) -> tuple[RunPlan, int]:
    """(output folder plan, gradient accumulation): everything checkable before loading, nothing changed."""
    accum = opts.gradient_accumulation_iters(world_size)
    plan = plan_run_dir(opts, resolve_resume(opts))
    resolve_model_ref(opts.prune_model, "--prune_model")  # a missing model fails here, before data is read
    if opts.distill_from:
        resolve_model_ref(opts.distill_from, "--distill_from")
    return plan, accum


def load_data(opts: FinetuneOptions) -> list[dict]:
    records = load_instruction_records(opts.data_path)
    check_val_split(opts.val_set_size, len(records))   # before the model is loaded
    return records


def setup_training(opts: FinetuneOptions, accum: int, world: tuple[int, int, int]) -> Setup:
    world_size, rank, local_rank = world
    if world_size > 1 and torch.cuda.is_available() and (opts.device is None or opts.device.startswith("cuda")):
        device = torch.device("cuda", local_rank)
    else:
        device = resolve_device(opts.device if world_size == 1 else (opts.device or "cpu"))
    dtype, desc, bf16, fp16 = precision(opts, device)
    gc = opts.gradient_checkpointing if opts.gradient_checkpointing is not None else device.type == "cuda"
    args = training_arguments(opts, accum=accum, device=device, gc=gc, bf16=bf16, fp16=fp16, rank=rank)
    log.info("global batch %d = micro batch %d x gradient accumulation %d x %d process(es)",
             opts.batch_size, opts.micro_batch_size, accum, world_size)
    return Setup(world_size, rank, accum, device, dtype, desc, bool(gc), args)


def load_student(opts: FinetuneOptions, setup: Setup) -> Student:
    model, tokenizer = load_model(opts.prune_model, dtype=setup.dtype, device=setup.device,
                                  allow_pickle=opts.allow_pickle, flag="--prune_model")
    if tokenizer is None:
        raise GQAPruneError(f"--prune_model {opts.prune_model}: no tokenizer was found with the model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    if not opts.full_finetune:
        opts.lora_target_modules = family_targets(model, opts.lora_target_modules)
        check_target_modules(model, opts.lora_target_modules)
    use_fused, fused = fused_kernel_plan(opts.fused_kernels, setup.device)
    teacher = None
    if opts.distill_from:
        teacher = load_teacher(opts.distill_from, tokenizer, model.config, dtype=setup.dtype, device=setup.device,
                               allow_pickle=opts.allow_pickle)
        log.info("distillation from %s: alpha %.3g, temperature %.3g (loss = alpha * T^2 * KL(teacher || student) "
                 "+ (1 - alpha) * LM loss)", opts.distill_from, opts.distill_alpha, opts.distill_temperature)
    if use_fused:
        fused = apply_fused_kernels(model, distill=teacher is not None)
    log.info("fused kernels: %s", fused)
    return Student(model, tokenizer, teacher, fused)


def build_datasets(opts: FinetuneOptions, setup: Setup, tokenizer, records: list[dict]) -> Datasets:
    with setup.args.main_process_first(local=False, desc="tokenise data"):
        train, val, cache_status, _ = prepare_data(opts, tokenizer, records)
    log.info("data: %d train / %d val examples, %d train tokens", len(train),
             len(val) if val is not None else 0, train.n_tokens)
    extra = check_extra_val(opts.extra_val_dataset)
    tracker = PPLTracker(extra, tokenizer, opts) if extra and setup.is_main else None
    return Datasets(train, val, cache_status, tracker, eval_enabled=val is not None or bool(extra))


def build_trainer(opts: FinetuneOptions, plan: RunPlan, setup: Setup, student: Student, data: Datasets,
                  callbacks: list | None) -> Run:
    folder = None
    # Inputs are good (model, tokenizer, data): only now does the output folder change.
    with setup.args.main_process_first(local=False, desc="prepare output dir"):
        if setup.is_main:
            folder = open_run_dir(opts, plan, setup.world_size)
    if opts.full_finetune:
        fingerprint = {}
        model = full_parameters(student.model, opts)
    else:
        fingerprint = base_fingerprint(student.model, None if opts.all_linear else opts.lora_target_modules)
        model = wrap_lora(student.model, opts)
    out = plan.out
    sink = MetricsSink(out, opts, enabled=setup.is_main)
    sample_log = out / f"samples_rank{setup.args.process_index}.txt" if opts.log_sample_ids else None
    if sample_log is not None and plan.resume is None and sample_log.exists():
        sample_log.unlink()
    cbs = [MetricsCallback(sink, data.tracker)] + ([EvalEvery(opts.eval_steps)] if data.eval_enabled else [])
    pad = student.tokenizer.pad_token_id
    trainer = LoRATrainer(
        model=model, args=setup.args, train_dataset=data.train, eval_dataset=data.val,
        data_collator=PadCollator(pad, sample_log=sample_log, pack=opts.packing),
        processing_class=student.tokenizer, callbacks=cbs + list(callbacks or []),
        teacher=student.teacher, distill_alpha=opts.distill_alpha, distill_temperature=opts.distill_temperature,
        ppl_tracker=data.tracker, eval_collator=PadCollator(pad) if opts.packing else None)
    trainer.remove_callback(PrinterCallback)   # library code logs; it does not print dicts
    trainer.remove_callback(ProgressCallback)
    if setup.is_main:
        trainer.add_callback(QuietProgress())
        sink.write(0 if plan.resume_step is None else plan.resume_step,
                   {"run/global_batch": opts.batch_size, "run/grad_accum": setup.accum,
                    "run/world_size": setup.world_size, "run/train_examples": len(data.train),
                    "run/precision": setup.precision, "run/resumed_from": plan.resume})
    stopper = None
    if setup.world_size == 1 and threading.current_thread() is threading.main_thread():
        stopper = GracefulStop()
        trainer.add_callback(stopper)
    if folder is not None:
        trainer.add_callback(ClaimCheckpoints(folder.add))   # last: it sees every callback's should_save
    return Run(trainer, sink, folder, fingerprint, stopper)


def train(opts: FinetuneOptions, plan: RunPlan, setup: Setup, data: Datasets, run: Run) -> Outcome:
    """Step-0 evaluation, the training loop, the final evaluation; a NaN/inf loss ends it as 'diverged'."""
    trainer, stopper, res = run.trainer, run.stopper, Outcome()
    t0 = time.perf_counter()
    train_start = side_start = train_end = side_end = None
    try:
        if stopper is not None:
            stopper.install()
        if data.eval_enabled and plan.resume is None:
            trainer.evaluate()  # step 0: val loss and PPL before fine-tuning
        train_start, side_start = time.perf_counter(), trainer.side_seconds
        trainer.train(resume_from_checkpoint=plan.resume)
        train_end, side_end = time.perf_counter(), trainer.side_seconds   # the final evaluation is not in the loop
        if stopper is not None and stopper.requested:
            ckpt = last_checkpoint(plan.out)
            raise Interrupted(f"stopped at optimizer step {trainer.state.global_step}; checkpoint saved: {ckpt}",
                              checkpoint=ckpt)
        if data.eval_enabled and (opts.eval_steps == 0 or trainer.state.global_step % opts.eval_steps):
            trainer.evaluate()
    except Diverged as e:
        last = last_checkpoint(plan.out)
        res.status, res.diverged = "diverged", e
        res.message = (f"training stopped: the loss became {e.loss} at optimizer step {e.step}; no update was "
                       f"applied from that step. Last good checkpoint: {last or 'none (none was saved yet)'}. "
                       "Try a lower --learning_rate, or bf16/fp32 instead of --fp16, then resume with "
                       "--resume_from_checkpoint.")
        log.error(res.message)
        train_end, side_end = time.perf_counter(), trainer.side_seconds
    except BaseException:
        run.sink.close()  # an interrupted run still closes its W&B run and TensorBoard file
        raise
    finally:
        if stopper is not None:
            stopper.uninstall()
    res.wall_seconds = time.perf_counter() - t0
    if train_start is not None:
        res.run_seconds = max(train_end - train_start - (side_end - side_start), 1e-9)
    tokens = torch.tensor(float(trainer.tokens_seen), device=setup.args.device)
    if setup.world_size > 1 and res.diverged is None:
        tokens = trainer.accelerator.reduce(tokens, reduction="sum")
    res.tokens_seen = int(tokens.item())
    return res


def _result(opts: FinetuneOptions, plan: RunPlan, setup: Setup, student: Student, data: Datasets, run: Run,
            outcome: Outcome) -> FinetuneResult:
    trainer, tracker, out = run.trainer, data.tracker, plan.out
    hist = trainer.state.log_history
    train_losses = [h["loss"] for h in hist if "loss" in h]
    eval_losses = [h["eval_loss"] for h in hist if "eval_loss" in h]
    ppl_before = {k: r.to_dict() for k, r in (tracker.first if tracker else {}).items()}
    if plan.resume is not None and setup.is_main:
        ppl_before = ppl_at_step0(out / METRICS) or ppl_before
    ppl_after = {} if outcome.diverged is not None else \
        {k: r.to_dict() for k, r in (tracker.latest if tracker else {}).items()}
    last = trainer.last_distill or {}
    return FinetuneResult(
        output_dir=str(out), adapter_dir=str(out), status=outcome.status, global_step=int(trainer.state.global_step),
        epoch=float(trainer.state.epoch or 0.0), world_size=setup.world_size, grad_accum=setup.accum,
        precision=setup.precision, gradient_checkpointing=setup.gc,
        train_examples=len(data.train), val_examples=len(data.val) if data.val is not None else 0,
        train_tokens=outcome.tokens_seen, train_seconds=round(float(outcome.run_seconds), 3),
        tokens_per_second=round(outcome.tokens_seen / outcome.run_seconds, 1),
        wall_seconds=round(outcome.wall_seconds, 3),
        final_train_loss=train_losses[-1] if train_losses else None,
        best_eval_loss=min(eval_losses) if eval_losses else best_eval_from_metrics(out / METRICS),
        ppl_before=ppl_before, ppl_after=ppl_after, dataset_cache=data.cache_status, resumed_from=plan.resume,
        metrics_path=str(out / METRICS), message=outcome.message,
        batching=" + ".join(b for b, on in (("length-grouped", opts.group_by_length), ("packed", opts.packing)) if on)
        or "padded",
        padding_fraction=round(1 - trainer.tokens_seen / trainer.positions_seen, 4) if trainer.positions_seen else 0.0,
        fused_kernels=student.fused,
        method="full" if opts.full_finetune else "lora",
        distill=None if student.teacher is None else {
            "teacher": opts.distill_from, "alpha": opts.distill_alpha, "temperature": opts.distill_temperature,
            "last_kl": last.get("kl"), "last_ce": last.get("ce")},
    )


def _save_claimed(folder: RunFolder, expected: tuple[str, ...], save) -> None:
    """Claim ``expected`` names before ``save()`` writes them, then whatever else it wrote at the top."""
    folder.add(*expected)
    before = {p.name for p in folder.path.iterdir()}
    save()
    folder.add(*({p.name for p in folder.path.iterdir()} - before))


def save_full_model(opts: FinetuneOptions, trainer, tokenizer, folder: RunFolder, result: FinetuneResult):
    """--full_finetune: the trained model as a checkpoint in output_dir/model, saved like the pruned input
    (a per-layer model stays per-layer, with its code) and with the input's prune plan."""
    from gqaprune.models.io import read_prune_plan, save_checkpoint

    src = Path(opts.prune_model).expanduser()
    plan = read_prune_plan(src)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True        # training switched the KV cache off; generation wants it back
    folder.add(FULL_MODEL_DIR)
    info = {"finetuned_from": str(src.resolve()) if src.exists() else opts.prune_model,
            "global_step": result.global_step, "train_tokens": result.train_tokens}
    # overwrite: only an earlier run of this folder (which gqaprune wrote) can have left output_dir/model
    return save_checkpoint(model, tokenizer, folder.path / FULL_MODEL_DIR, plan=plan,
                           overwrite=True, kind="finetune", flag="--output_dir", info=info)


def write_outputs(opts: FinetuneOptions, plan: RunPlan, setup: Setup, student: Student, data: Datasets, run: Run,
                  outcome: Outcome) -> FinetuneResult:
    """Rank 0: the adapter (unless diverged), tokenizer, summary and plot. Raises TrainingDivergedError."""
    result = _result(opts, plan, setup, student, data, run, outcome)
    out, trainer, folder = plan.out, run.trainer, run.folder
    if setup.is_main:
        if outcome.diverged is None and opts.full_finetune:
            result.adapter_dir = ""
            result.checkpoint_dir = str(save_full_model(opts, trainer, student.tokenizer, folder, result))
        elif outcome.diverged is None:
            model = trainer.accelerator.unwrap_model(trainer.model)
            info = {"base_model": model.peft_config["default"].base_model_name_or_path,
                    "base_fingerprint": run.fingerprint, "lora_target_modules": list(opts.lora_target_modules),
                    "global_step": result.global_step}
            _save_claimed(folder, _ADAPTER_FILES, lambda: (
                model.save_pretrained(str(out)), atomic_write(out / ADAPTER_INFO, json.dumps(info, indent=2))))
            _save_claimed(folder, _TOKENIZER_FILES, lambda: student.tokenizer.save_pretrained(str(out)))
        else:
            result.adapter_dir = ""
        run.sink.write(result.global_step, {"summary/tokens_per_second": result.tokens_per_second,
                                            "summary/status": outcome.status})
        run.sink.close()
        folder.add(PLOT, SUMMARY)
        try:
            png = plot_curves(out / METRICS, out / PLOT)
            result.plot_path = str(png) if png else None
        except Exception as e:  # noqa: BLE001 - an optional figure, drawn after the run: it must not lose the run
            log.warning("could not draw %s: %s", PLOT, e)
        atomic_write(out / SUMMARY, json.dumps(result.to_dict(), indent=2))
    if outcome.diverged is not None:
        raise TrainingDivergedError(outcome.message, outcome.diverged.step, last_checkpoint(out))
    return result


def finetune(opts: FinetuneOptions, *, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune a pruned model with LoRA; write the adapter and the run's records to ``opts.output_dir``.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. early stopping).
    Raises GQAPruneError for bad input, TrainingDivergedError when the loss becomes NaN/inf.
    """
    world = _world()
    plan, accum = plan_run(opts, world[0])
    records = load_data(opts)
    setup = setup_training(opts, accum, world)
    student = load_student(opts, setup)
    data = build_datasets(opts, setup, student.tokenizer, records)
    run = build_trainer(opts, plan, setup, student, data, callbacks)
    outcome = train(opts, plan, setup, data, run)
    return write_outputs(opts, plan, setup, student, data, run, outcome)


__all__ = ["FinetuneOptions", "FinetuneResult", "TrainingDivergedError", "finetune"]
