"""Fine-tuning options as groups (litgpt's ``args.py``): each group checks its own fields once, when built.

``FinetuneOptions`` inherits every group, so the flags stay flat and keep the seed guide's
``post_training.py`` names (LLM-Pruner / alpaca-lora); only the ``--help`` headings group them.
A check that needs the run's world size is a derived value instead of a field check:
``TrainArgs.gradient_accumulation_iters(world_size)``.

``LoraRankArgs`` holds the one declaration of the LoRA rank default; ``gqaprune run`` and
``gqaprune check`` reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gqaprune.errors import GQAPruneError
from gqaprune.options import Args, DeviceArgs, PickleArgs, opt

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
KNOWN_CORPORA = ("wikitext2", "ptb", "c4")


def _at_least(obj, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(obj, name) < low:
            raise GQAPruneError(f"--{name} {getattr(obj, name)}: must be >= {low}")


def grad_accumulation(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per process per optimizer step: global batch = micro * accumulation * processes.

    Refuses a global batch that the processes' micro-batches do not divide.
    """
    if batch_size < 1 or micro_batch_size < 1:
        raise GQAPruneError(f"--batch_size {batch_size} / --micro_batch_size {micro_batch_size}: both must be >= 1")
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        lo = max(per_step, batch_size // per_step * per_step)
        raise GQAPruneError(
            f"--batch_size {batch_size}: the global batch must be a multiple of --micro_batch_size "
            f"{micro_batch_size} x {world_size} process(es) = {per_step}; use e.g. --batch_size {lo} or "
            f"{lo + per_step}, or change --micro_batch_size."
        )
    return batch_size // per_step


def extra_val_key(name: str) -> str:
    """Metric-name key for an extra val corpus: the corpus name, or the file's stem (``eval/<key>_ppl``)."""
    import re

    p = Path(name).expanduser()
    if p.is_file():
        stem = p.name
        for suf in (".gz", ".jsonl", ".json", ".txt", ".raw"):
            stem = stem.removesuffix(suf)
        return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "file"
    from gqaprune.data.corpora import CORPUS_ALIASES

    return CORPUS_ALIASES.get(name.lower(), name.lower())


def check_extra_val(names: list[str]) -> dict[str, str]:
    """Map metric key -> corpus name/path; refuse names that are neither a known corpus nor a file."""
    from gqaprune.data.corpora import CORPUS_ALIASES

    out: dict[str, str] = {}
    for name in names:
        if not Path(name).expanduser().is_file() and name.lower() not in CORPUS_ALIASES:
            raise GQAPruneError(
                f"--extra_val_dataset {name}: not a known corpus ({', '.join(KNOWN_CORPORA)}) and no such file; "
                "pass one of those names or a path to a .txt/.json/.jsonl(.gz) file."
            )
        key = extra_val_key(name)
        if key in out:
            raise GQAPruneError(f"--extra_val_dataset: {name!r} is listed twice (as {out[key]!r})")
        out[key] = name
    return out


# ------------------------------------------------------------------------------ groups
@dataclass
class LoraRankArgs(Args):
    """The LoRA rank alone (``gqaprune check`` estimates memory from it)."""

    GROUP = "LoRA"
    lora_r: int = opt(8, "LoRA rank")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("lora_r",), 1)


@dataclass
class LoraArgs(LoraRankArgs):
    """The LoRA adapter: rank, scale, dropout and which Linear modules it adapts."""

    GROUP = "LoRA"
    lora_alpha: int = opt(16, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = opt(help="comma-separated Linear module names to adapt (or all-linear)",
                                         factory=lambda: list(DEFAULT_TARGET_MODULES))
    full_finetune: bool = opt(False, "train every weight instead of a LoRA adapter (the --lora_* flags are then "
                                     "unused); the trained model is saved as a checkpoint in output_dir/model, "
                                     "so no merge is needed")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("lora_alpha",), 1)
        if not 0 <= self.lora_dropout < 1:
            raise GQAPruneError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")
        if not self.lora_target_modules:
            raise GQAPruneError("--lora_target_modules is empty; name the Linear modules to adapt, e.g. q_proj,v_proj")

    @property
    def all_linear(self) -> bool:
        """PEFT's shorthand ``all-linear``: every Linear except the output head."""
        return list(self.lora_target_modules) == ["all-linear"]


@dataclass
class DataArgs(Args):
    """Instruction data, its train/val split, tokenisation and the tokenised-data cache."""

    GROUP = "data"
    data_path: str = opt("yahma/alpaca-cleaned", "instruction data: hub id or local .json/.jsonl(.gz) with "
                                                 "instruction/input/output (offline via GQAPRUNE_DATA_DIR)")
    cutoff_len: int = opt(256, "max tokens per example (prompt + response); longer examples are truncated")
    val_set_size: int = opt(2000, "records held out (fixed seed) for the validation loss; 0 = none")
    train_on_inputs: bool = opt(False, "also train on the prompt tokens (default: only the response is in the loss)")
    add_eos_token: bool = opt(False, "append the EOS token to each example")
    max_train_samples: int | None = opt(None, "use at most this many training records (quick runs)")
    cache_dataset: bool = opt(False, "cache the tokenised data (keyed by tokenizer, data and settings) and reuse it")
    cache_dir: str | None = opt(None, "tokenised-data cache folder (default: $GQAPRUNE_CACHE_DIR or "
                                      "~/.cache/gqaprune/tokenized)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("cutoff_len",), 1)
        _at_least(self, ("val_set_size",), 0)
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise GQAPruneError(f"--max_train_samples {self.max_train_samples}: must be >= 1")


@dataclass
class TrainArgs(Args):
    """The optimisation: batch sizes, schedule, steps, checkpoints, precision and throughput switches."""

    GROUP = "training"
    num_epochs: float = opt(2.0, "training epochs over the training split")
    learning_rate: float = opt(5e-5, "peak learning rate (linear warmup, then linear decay)")
    batch_size: int = opt(128, "global batch: sequences per optimizer step, all processes together")
    micro_batch_size: int = opt(4, "sequences per process per forward/backward pass")
    warmup_steps: int = opt(100, "optimizer steps of linear learning-rate warmup")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --num_epochs)")
    save_steps: int = opt(200, "save a resumable checkpoint every this many optimizer steps")
    save_total_limit: int = opt(3, "keep at most this many checkpoints (oldest removed first)")
    resume_from_checkpoint: str | None = opt(None, "continue a run: a checkpoint-N folder, or 'last' for the newest "
                                                   "in output_dir")
    seed: int = opt(42, "seed for the val split, LoRA init and data order")
    gradient_checkpointing: bool | None = opt(None, "recompute activations in backward to save memory "
                                                    "(default: on for GPU, off for CPU)")
    fp16: bool = opt(False, "fp16 base weights + mixed precision (unstable on Llama-2/3; only when asked)")
    bf16: bool | None = opt(None, "bf16 base weights + mixed precision (default: on where the GPU supports it)")
    group_by_length: bool = opt(False, "batch examples of similar length together (less padding; the Trainer's "
                                       "length-grouped sampler)")
    packing: bool = opt(False, "padding-free: each micro-batch's examples in one row, positions restarting per "
                               "example and attention kept inside each example (same examples per step); output "
                               "logits only where a token is in the loss")
    fused_kernels: bool | None = opt(None, "Liger fused kernels (RMSNorm, SwiGLU, RoPE, linear+cross-entropy) "
                                           "(default: on when liger-kernel is installed and training on CUDA)")

    def __post_init__(self) -> None:
        super().__post_init__()
        # one process must divide the global batch too; finetune() checks again for the run's world size
        grad_accumulation(self.batch_size, self.micro_batch_size, 1)
        _at_least(self, ("save_steps", "save_total_limit"), 1)
        _at_least(self, ("warmup_steps",), 0)
        if self.learning_rate <= 0:
            raise GQAPruneError(f"--learning_rate {self.learning_rate}: must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise GQAPruneError(f"--max_steps {self.max_steps}: must be >= 1 (leave it out to train --num_epochs)")
        if self.max_steps is None and self.num_epochs <= 0:
            raise GQAPruneError(f"--num_epochs {self.num_epochs}: must be > 0")
        if self.fp16 and self.bf16:
            raise GQAPruneError("--fp16 and --bf16 were both given; choose one")

    def gradient_accumulation_iters(self, world_size: int) -> int:
        """Micro-batches each process accumulates per optimizer step (refuses a batch that does not divide)."""
        return grad_accumulation(self.batch_size, self.micro_batch_size, world_size)


@dataclass
class EvalArgs(Args):
    """Evaluation during training: the val loss and extra perplexity corpora."""

    GROUP = "evaluation during training"
    eval_steps: int = opt(100, "evaluate (val loss + extra PPL) every this many optimizer steps; 0 = only at the end")
    extra_val_dataset: list[str] = opt(help="comma-separated corpora for perplexity at each eval: wikitext2, ptb, "
                                            "c4, or a text/JSON file", factory=list)
    extra_val_max_tokens: int | None = opt(None, "score only the first N tokens of each extra val corpus (quick runs)")
    ppl_seq_len: int = opt(128, "perplexity window length in tokens (stride = window)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("eval_steps",), 0)
        _at_least(self, ("ppl_seq_len",), 1)
        check_extra_val(self.extra_val_dataset)


@dataclass
class LogArgs(Args):
    """Where the run's metrics go besides metrics.jsonl."""

    GROUP = "logging"
    wandb_project: str = opt("", "also log to this W&B project (offline, into output_dir/wandb, when no API key "
                                 "is found)")
    tensorboard: bool = opt(False, "also log to TensorBoard in output_dir/tensorboard")
    logging_steps: int = opt(10, "log the training loss every this many optimizer steps")
    log_sample_ids: bool = opt(False, "write the record indices each process trained on to "
                                      "output_dir/samples_rank<R>.txt (audit sharding and data order)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("logging_steps",), 1)


@dataclass
class DistillArgs(Args):
    """Knowledge distillation from a (dense) teacher."""

    GROUP = "distillation"
    distill_from: str | None = opt(None, "distil from this (dense) model: loss = alpha * T^2 * KL(teacher || "
                                         "student at temperature T) + (1 - alpha) * LM loss; same tokenizer needed")
    distill_alpha: float = opt(0.5, "weight of the distillation term, in [0, 1] (with --distill_from)")
    distill_temperature: float = opt(2.0, "softmax temperature T of the distillation term (with --distill_from)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.distill_alpha <= 1:
            raise GQAPruneError(f"--distill_alpha {self.distill_alpha}: must be in [0, 1] (the weight of the KL term)")
        if not self.distill_temperature > 0:
            raise GQAPruneError(f"--distill_temperature {self.distill_temperature}: must be > 0")


@dataclass
class FinetuneOptions(LoraArgs, DataArgs, TrainArgs, EvalArgs, LogArgs, DistillArgs, DeviceArgs, PickleArgs):
    """LoRA fine-tuning options; the names are the seed guide's post_training.py flags."""

    prune_model: str | None = opt(None, "pruned model: gqaprune checkpoint folder, hub id, alias, or a legacy "
                                        "pytorch_model.bin (with --allow_pickle)", aliases=("--pruned_model",))
    output_dir: str = opt("./lora-alpaca", "folder for the adapter, checkpoints, metrics.jsonl, plot and summary")
    overwrite: bool = opt(False, "replace an earlier gqaprune fine-tuning run in output_dir (a folder holding "
                                 "files gqaprune did not write is refused)")

    def __post_init__(self) -> None:
        if not self.prune_model:
            raise GQAPruneError("--prune_model is required: the pruned checkpoint folder to fine-tune")
        super().__post_init__()


__all__ = ["DEFAULT_TARGET_MODULES", "DataArgs", "DistillArgs", "EvalArgs", "FinetuneOptions", "LogArgs", "LoraArgs",
           "LoraRankArgs", "TrainArgs", "check_extra_val", "extra_val_key", "grad_accumulation"]
