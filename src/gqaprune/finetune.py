"""LoRA recovery fine-tuning of a pruned model: PEFT LoRA + the transformers Trainer.

``finetune(FinetuneOptions(...))`` is the whole run: it checks the inputs, tokenises
Alpaca-format instruction data (optionally cached), wraps the pruned model in LoRA,
trains data-parallel when launched by ``torchrun`` / ``accelerate launch``, evaluates
the held-out loss and extra perplexities every ``eval_steps``, and leaves in
``output_dir``: the adapter (PEFT ``save_pretrained``), ``checkpoint-N/`` folders for
``--resume_from_checkpoint``, ``metrics.jsonl``, ``training_curves.png``,
``run_manifest.json`` and ``finetune_summary.json``.

Option names are the seed guide's ``post_training.py`` flags (LLM-Pruner / alpaca-lora),
so its command lines run unchanged through ``scripts/post_training.py``.

LoRA on per-layer pruned models needs no patching: PEFT wraps each ``nn.Linear`` on its
own, and the per-layer model derives head counts from projection widths.

Recovery options beyond the guide's: ``--distill_from`` (knowledge distillation from the
dense model, teacher run per micro-batch without gradients), and for throughput
``--group_by_length``, ``--packing`` (padding-free micro-batches with per-example
attention) and Liger fused kernels where installed. None of the throughput options
changes which examples make up an optimizer step except ``--group_by_length``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gqaprune.errors import GQAPruneError, Interrupted
from gqaprune.options import opt

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
KNOWN_CORPORA = ("wikitext2", "ptb", "c4")
MANIFEST = "run_manifest.json"
METRICS = "metrics.jsonl"
SUMMARY = "finetune_summary.json"
PLOT = "training_curves.png"
ADAPTER_INFO = "gqaprune_adapter.json"
CACHE_FORMAT = 1
# Files finetune writes at the top of output_dir (removed by --overwrite; nothing else is).
_OWN_FILES = (MANIFEST, METRICS, SUMMARY, PLOT, ADAPTER_INFO, "adapter_config.json", "adapter_model.safetensors",
              "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_OWN_DIRS = ("wandb", "tensorboard")
# Options that may change between a run and its resumption without making it another run.
_RESUMABLE_CHANGES = {
    "output_dir", "resume_from_checkpoint", "overwrite", "max_steps", "num_epochs", "eval_steps", "save_steps",
    "save_total_limit", "logging_steps", "wandb_project", "tensorboard", "extra_val_dataset", "extra_val_max_tokens",
    "ppl_seq_len", "device", "cache_dataset", "cache_dir", "log_sample_ids", "allow_pickle", "gradient_checkpointing",
    "fused_kernels",
}


@dataclass
class FinetuneOptions:
    """LoRA fine-tuning options; the names are the seed guide's post_training.py flags."""

    prune_model: str | None = opt(None, "pruned model: gqaprune checkpoint folder, hub id, alias, or a legacy "
                                        "pytorch_model.bin (with --allow_pickle)", aliases=("--pruned_model",))
    data_path: str = opt("yahma/alpaca-cleaned", "instruction data: hub id or local .json/.jsonl(.gz) with "
                                                 "instruction/input/output (offline via GQAPRUNE_DATA_DIR)")
    output_dir: str = opt("./lora-alpaca", "folder for the adapter, checkpoints, metrics.jsonl, plot and summary")
    wandb_project: str = opt("", "also log to this W&B project (WANDB_MODE=offline works without network)")
    num_epochs: float = opt(2.0, "training epochs over the training split")
    learning_rate: float = opt(5e-5, "peak learning rate (linear warmup, then linear decay)")
    batch_size: int = opt(128, "global batch: sequences per optimizer step, all processes together")
    micro_batch_size: int = opt(4, "sequences per process per forward/backward pass")
    cutoff_len: int = opt(256, "max tokens per example (prompt + response); longer examples are truncated")
    val_set_size: int = opt(2000, "records held out (fixed seed) for the validation loss; 0 = none")
    warmup_steps: int = opt(100, "optimizer steps of linear learning-rate warmup")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = opt(help="comma-separated Linear module names to adapt (or all-linear)",
                                         factory=lambda: list(DEFAULT_TARGET_MODULES))
    train_on_inputs: bool = opt(False, "also train on the prompt tokens (default: only the response is in the loss)")
    add_eos_token: bool = opt(False, "append the EOS token to each example")
    extra_val_dataset: list[str] = opt(help="comma-separated corpora for perplexity at each eval: wikitext2, ptb, "
                                            "c4, or a text/JSON file", factory=list)
    cache_dataset: bool = opt(False, "cache the tokenised data (keyed by tokenizer, data and settings) and reuse it")
    cache_dir: str | None = opt(None, "tokenised-data cache folder (default: $GQAPRUNE_CACHE_DIR or "
                                      "~/.cache/gqaprune/tokenized)")
    resume_from_checkpoint: str | None = opt(None, "continue a run: a checkpoint-N folder, or 'last' for the newest "
                                                   "in output_dir")
    eval_steps: int = opt(100, "evaluate (val loss + extra PPL) every this many optimizer steps; 0 = only at the end")
    save_steps: int = opt(200, "save a resumable checkpoint every this many optimizer steps")
    save_total_limit: int = opt(3, "keep at most this many checkpoints (oldest removed first)")
    logging_steps: int = opt(10, "log the training loss every this many optimizer steps")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --num_epochs)")
    max_train_samples: int | None = opt(None, "use at most this many training records (quick runs)")
    gradient_checkpointing: bool | None = opt(None, "recompute activations in backward to save memory "
                                                    "(default: on for GPU, off for CPU)")
    fp16: bool = opt(False, "fp16 base weights + mixed precision (unstable on Llama-2/3; only when asked)")
    bf16: bool | None = opt(None, "bf16 base weights + mixed precision (default: on where the GPU supports it)")
    tensorboard: bool = opt(False, "also log to TensorBoard in output_dir/tensorboard")
    seed: int = opt(42, "seed for the val split, LoRA init and data order")
    allow_pickle: bool = opt(False, "allow loading a legacy pickled model (runs code stored in the file)")
    overwrite: bool = opt(False, "replace an earlier run in output_dir")
    extra_val_max_tokens: int | None = opt(None, "score only the first N tokens of each extra val corpus (quick runs)")
    ppl_seq_len: int = opt(128, "perplexity window length in tokens (stride = window)")
    device: str | None = opt(None, "device for a single-process run (default: cuda if available, else cpu)")
    log_sample_ids: bool = opt(False, "write the record indices each process trained on to "
                                      "output_dir/samples_rank<R>.txt (audit sharding and data order)")
    distill_from: str | None = opt(None, "distil from this (dense) model: loss = alpha * T^2 * KL(teacher || "
                                         "student at temperature T) + (1 - alpha) * LM loss; same tokenizer needed")
    distill_alpha: float = opt(0.5, "weight of the distillation term, in [0, 1] (with --distill_from)")
    distill_temperature: float = opt(2.0, "softmax temperature T of the distillation term (with --distill_from)")
    group_by_length: bool = opt(False, "batch examples of similar length together (less padding; the Trainer's "
                                       "length-grouped sampler)")
    packing: bool = opt(False, "padding-free: each micro-batch's examples in one row, positions restarting per "
                               "example and attention kept inside each example (same examples per step); output "
                               "logits only where a token is in the loss")
    fused_kernels: bool | None = opt(None, "Liger fused kernels (RMSNorm, SwiGLU, RoPE, linear+cross-entropy) "
                                           "(default: on when liger-kernel is installed and training on CUDA)")


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

    def lines(self) -> list[str]:
        """A one-screen summary for the CLI."""
        out = [
            f"LoRA fine-tuning {self.status}: {self.global_step} optimizer steps ({self.epoch:.2f} epochs), "
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
        out.append(f"  adapter: {self.adapter_dir}")
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


# ----------------------------------------------------------------------------------------- checks


def _world() -> tuple[int, int, int]:
    """(world size, global rank, local rank) from the torchrun / accelerate environment."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def grad_accumulation(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Optimizer-step batch = micro * accumulation * processes; refuse when it does not divide."""
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


def _extra_val_key(name: str) -> str:
    """Metric-name key for an extra val corpus: the corpus name, or the file's stem."""
    p = Path(name).expanduser()
    if p.is_file():
        stem = p.name
        for suf in (".gz", ".jsonl", ".json", ".txt", ".raw"):
            stem = stem.removesuffix(suf)
        return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "file"
    from gqaprune.data import CORPUS_ALIASES

    return CORPUS_ALIASES.get(name.lower(), name.lower())


def check_extra_val(names: list[str]) -> dict[str, str]:
    """Map metric key -> corpus name/path; refuse names that are neither a known corpus nor a file."""
    from gqaprune.data import CORPUS_ALIASES

    out: dict[str, str] = {}
    for name in names:
        if not Path(name).expanduser().is_file() and name.lower() not in CORPUS_ALIASES:
            raise GQAPruneError(
                f"--extra_val_dataset {name}: not a known corpus ({', '.join(KNOWN_CORPORA)}) and no such file; "
                "pass one of those names or a path to a .txt/.json/.jsonl(.gz) file."
            )
        key = _extra_val_key(name)
        if key in out:
            raise GQAPruneError(f"--extra_val_dataset: {name!r} is listed twice (as {out[key]!r})")
        out[key] = name
    return out


def _check_options(opts: FinetuneOptions, world_size: int) -> int:
    if not opts.prune_model:
        raise GQAPruneError("--prune_model is required: the pruned checkpoint folder to fine-tune")
    accum = grad_accumulation(opts.batch_size, opts.micro_batch_size, world_size)
    for name in ("cutoff_len", "lora_r", "lora_alpha", "ppl_seq_len", "save_steps", "logging_steps",
                 "save_total_limit"):
        if getattr(opts, name) < 1:
            raise GQAPruneError(f"--{name} {getattr(opts, name)}: must be >= 1")
    for name in ("val_set_size", "warmup_steps", "eval_steps"):
        if getattr(opts, name) < 0:
            raise GQAPruneError(f"--{name} {getattr(opts, name)}: must be >= 0")
    if not 0 <= opts.lora_dropout < 1:
        raise GQAPruneError(f"--lora_dropout {opts.lora_dropout}: must be in [0, 1)")
    if opts.learning_rate <= 0:
        raise GQAPruneError(f"--learning_rate {opts.learning_rate}: must be > 0")
    if opts.max_steps is not None and opts.max_steps < 1:
        raise GQAPruneError(f"--max_steps {opts.max_steps}: must be >= 1 (leave it out to train --num_epochs)")
    if opts.max_steps is None and opts.num_epochs <= 0:
        raise GQAPruneError(f"--num_epochs {opts.num_epochs}: must be > 0")
    if opts.max_train_samples is not None and opts.max_train_samples < 1:
        raise GQAPruneError(f"--max_train_samples {opts.max_train_samples}: must be >= 1")
    if opts.fp16 and opts.bf16:
        raise GQAPruneError("--fp16 and --bf16 were both given; choose one")
    if not opts.lora_target_modules:
        raise GQAPruneError("--lora_target_modules is empty; name the Linear modules to adapt, e.g. q_proj,v_proj")
    check_extra_val(opts.extra_val_dataset)
    if not 0 <= opts.distill_alpha <= 1:
        raise GQAPruneError(f"--distill_alpha {opts.distill_alpha}: must be in [0, 1] (the weight of the KL term)")
    if not opts.distill_temperature > 0:
        raise GQAPruneError(f"--distill_temperature {opts.distill_temperature}: must be > 0")
    return accum


def _resolve_resume(opts: FinetuneOptions) -> str | None:
    """The checkpoint folder to resume from, or None."""
    r = opts.resume_from_checkpoint
    if not r:
        return None
    out = Path(opts.output_dir)
    if r.lower() in ("last", "latest", "true", "auto", "1", "yes"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise GQAPruneError(
                f"--resume_from_checkpoint {r}: no checkpoint-N folder in --output_dir {out}; nothing to resume. "
                "Start without --resume_from_checkpoint, or point at the run's output folder."
            )
        return last
    p = Path(r).expanduser()
    if p.is_dir() and not (p / "trainer_state.json").is_file():
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(p))
        if last is not None:
            return last
    if not (p / "trainer_state.json").is_file():
        raise GQAPruneError(
            f"--resume_from_checkpoint {r}: not a training checkpoint (no trainer_state.json); pass a "
            f"checkpoint-N folder written by a run, or 'last'."
        )
    return str(p)


def _manifest_options(opts: FinetuneOptions) -> dict:
    d = asdict(opts)
    p = Path(str(opts.prune_model)).expanduser()
    if p.exists():
        d["prune_model"] = str(p.resolve())
    dp = Path(opts.data_path).expanduser()
    if dp.exists():
        d["data_path"] = str(dp.resolve())
    return d


def _own_entries(out: Path) -> list[Path]:
    ents = [out / n for n in _OWN_FILES + _OWN_DIRS]
    ents += list(out.glob("checkpoint-*")) + list(out.glob("samples_rank*.txt"))
    return [e for e in ents if e.exists()]


def _check_output_dir(opts: FinetuneOptions, resume: str | None) -> str:
    """Decide what to do with output_dir (read-only): 'fresh', 'resume' or 'overwrite'."""
    out = Path(opts.output_dir)
    if out.exists() and not out.is_dir():
        raise GQAPruneError(f"--output_dir {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return "fresh"  # (also: resuming from a checkpoint elsewhere into a new folder)
    man_path = out / MANIFEST
    manifest = None
    if man_path.is_file():
        try:
            manifest = json.loads(man_path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = None
    if resume is not None:
        if manifest is None:
            if opts.overwrite:
                return "resume"
            raise GQAPruneError(
                f"--output_dir {out}: holds files but no {MANIFEST}, so it is not a gqaprune fine-tuning run that "
                "can be resumed here; pass another --output_dir (or --overwrite to write into it anyway)."
            )
        diffs = _manifest_diff(manifest.get("options", {}), _manifest_options(opts))
        if diffs and not opts.overwrite:
            raise GQAPruneError(
                f"--output_dir {out}: holds a different run than the one being resumed; these options differ: "
                + "; ".join(diffs) + ". Resume with the original options, or pass --overwrite to accept the change."
            )
        return "resume"
    if opts.overwrite:
        return "overwrite"
    if manifest is None:
        raise GQAPruneError(
            f"--output_dir {out}: the folder is not empty and holds no gqaprune run; choose an empty or new "
            "folder, or pass --overwrite (only gqaprune's own files in it are replaced)."
        )
    diffs = _manifest_diff(manifest.get("options", {}), _manifest_options(opts))
    if not diffs and not list(out.glob("checkpoint-*")) and not (out / SUMMARY).exists():
        return "overwrite"  # the same run stopped before its first checkpoint: nothing to keep, start again
    what = "a different run (" + "; ".join(diffs) + ")" if diffs else "an earlier run with the same options"
    raise GQAPruneError(
        f"--output_dir {out}: holds {what}. Pass --resume_from_checkpoint last to continue it, --overwrite to "
        "replace it, or choose another --output_dir."
    )


def _manifest_diff(old: dict, new: dict) -> list[str]:
    # A run recorded before an option existed ran with that option's default.
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneOptions)
                if f.default is not dataclasses.MISSING}
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k in _RESUMABLE_CHANGES:
            continue
        if old.get(k, defaults.get(k)) != new.get(k):
            diffs.append(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now")
    return diffs


def _prepare_output_dir(opts: FinetuneOptions, decision: str, resume_step: int | None) -> None:
    """Rank 0 only: clear an overwritten run, trim metrics after the resume point, write the manifest."""
    out = Path(opts.output_dir)
    if decision == "overwrite":
        for e in _own_entries(out):
            shutil.rmtree(e) if e.is_dir() else e.unlink()
        log.warning("--overwrite: removed the earlier run's files from %s", out)
    out.mkdir(parents=True, exist_ok=True)
    if decision == "resume":
        # Steps after the checkpoint are re-run: drop their old metric lines (and sample logs restart).
        mp = out / METRICS
        if mp.is_file() and resume_step is not None:
            keep = [ln for ln in mp.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            mp.write_text("".join(ln + "\n" for ln in keep))
    manifest = {"kind": "gqaprune-finetune", "options": _manifest_options(opts),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ data


@dataclass
class TokenizedSplit(torch.utils.data.Dataset):
    """Variable-length examples stored flat: example i is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray       # int32, all examples concatenated
    labels: np.ndarray    # int32, -100 where the token is not in the loss
    offsets: np.ndarray   # int64, len = n + 1
    record_idx: np.ndarray  # int64, index of each example in the loaded records
    is_train: bool = True   # the collator's sample log records training batches only

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.ids[a:b], "labels": self.labels[a:b], "idx": int(self.record_idx[i]),
                "train": self.is_train}

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[list[int]], idx: list[int]) -> "TokenizedSplit":
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        flat = lambda xs: np.fromiter((t for x in xs for t in x), dtype=np.int32, count=int(offsets[-1]))  # noqa: E731
        return cls(flat(ids), flat(labels), offsets, np.asarray(idx, dtype=np.int64))


def prompt_template_tokens(tokenizer) -> int:
    """Tokens in the Alpaca template with an empty instruction: the least any prompt takes."""
    from gqaprune.data import alpaca_prompt

    return len(tokenizer(alpaca_prompt("", ""))["input_ids"])


def tokenize_records(records: list[dict], indices, tokenizer, *, cutoff_len: int, train_on_inputs: bool,
                     add_eos_token: bool) -> tuple[TokenizedSplit, int]:
    """Alpaca-format examples -> token ids and labels (alpaca-lora's recipe); returns (split, dropped).

    The full text (prompt + response) is tokenised once and cut at ``cutoff_len``; with
    ``train_on_inputs`` off, the labels of the prompt's tokens are -100. Examples left with
    no token in the loss (prompt alone fills ``cutoff_len``) are dropped and counted.
    """
    from gqaprune.data import alpaca_prompt

    indices = [int(i) for i in indices]
    prompts = [alpaca_prompt(str(records[i].get("instruction", "")), str(records[i].get("input", "") or ""))
               for i in indices]
    fulls = [p + str(records[i].get("output", "")) for p, i in zip(prompts, indices)]
    eos = tokenizer.eos_token_id
    enc = tokenizer(fulls, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    prompt_lens = ([0] * len(indices) if train_on_inputs else
                   [len(x) for x in tokenizer(prompts, truncation=True, max_length=cutoff_len,
                                              padding=False)["input_ids"]])
    ids_out, lab_out, idx_out, dropped = [], [], [], 0
    for ids, plen, i in zip(enc, prompt_lens, indices):
        ids = list(ids)
        if add_eos_token and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = [-100] * min(plen, len(ids)) + ids[plen:]
        if not any(t != -100 for t in labels[1:]):
            dropped += 1
            continue
        ids_out.append(ids)
        lab_out.append(labels)
        idx_out.append(i)
    return TokenizedSplit.from_lists(ids_out, lab_out, idx_out), dropped


def split_indices(n: int, val_set_size: int, seed: int, max_train_samples: int | None) -> tuple[list[int], list[int]]:
    """(train, val) record indices: a fixed-seed permutation, val first, train capped."""
    perm = np.random.default_rng(seed).permutation(n)
    val, train = perm[:val_set_size], perm[val_set_size:]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    return train.tolist(), val.tolist()


def _tokenizer_fingerprint(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    probe = tokenizer("Below is an instruction.\n### Response:\nok")["input_ids"]
    return {"class": type(tokenizer).__name__, "name": getattr(tokenizer, "name_or_path", ""), "vocab_sha256": h,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, "probe": probe}


def _records_fingerprint(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.get("instruction", ""), r.get("input", ""), r.get("output", "")],
                            ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("GQAPRUNE_CACHE_DIR")
    return Path(env).expanduser() / "tokenized" if env else Path.home() / ".cache" / "gqaprune" / "tokenized"


def _cache_key(opts: FinetuneOptions, tokenizer, records: list[dict]) -> tuple[str, dict]:
    from gqaprune.data import alpaca_prompt, resolve_instruction_source

    meta = {
        "format": CACHE_FORMAT,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "data": {"data_path": opts.data_path, "source": resolve_instruction_source(opts.data_path),
                 "n_records": len(records), "content_sha256": _records_fingerprint(records)},
        "settings": {"cutoff_len": opts.cutoff_len, "train_on_inputs": opts.train_on_inputs,
                     "add_eos_token": opts.add_eos_token, "val_set_size": opts.val_set_size,
                     "max_train_samples": opts.max_train_samples, "seed": opts.seed,
                     "template": hashlib.sha256((alpaca_prompt("{i}", "{x}") + alpaca_prompt("{i}")).encode())
                     .hexdigest()},
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24], meta


def _save_cache(folder: Path, train: TokenizedSplit, val: TokenizedSplit | None, meta: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    arrays = {f"train_{k}": getattr(train, k) for k in ("ids", "labels", "offsets", "record_idx")}
    if val is not None:
        arrays.update({f"val_{k}": getattr(val, k) for k in ("ids", "labels", "offsets", "record_idx")})
    np.savez(tmp / "tokens.npz", **arrays)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(folder: Path) -> tuple[TokenizedSplit, TokenizedSplit | None] | None:
    f = folder / "tokens.npz"
    if not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            get = lambda p: TokenizedSplit(*(z[f"{p}_{k}"] for k in ("ids", "labels", "offsets", "record_idx")))  # noqa: E731
            train, val = get("train"), (get("val") if "val_ids" in z.files else None)
    except (OSError, KeyError, ValueError) as e:
        log.warning("tokenised-data cache %s is unreadable (%s); tokenising again", folder, e)
        return None
    if val is not None:
        val.is_train = False
    return train, val


def prepare_data(opts: FinetuneOptions, tokenizer, records: list[dict]
                 ) -> tuple[TokenizedSplit, TokenizedSplit | None, str, dict]:
    """Split, tokenise (or load from the cache); returns (train, val, cache status, info)."""
    template = prompt_template_tokens(tokenizer)
    if opts.cutoff_len <= template:
        raise GQAPruneError(
            f"--cutoff_len {opts.cutoff_len}: shorter than the prompt template alone ({template} tokens with this "
            f"tokenizer), so no example would keep any response token. Use a larger value (the guide uses 256)."
        )
    n = len(records)
    if opts.val_set_size >= n:
        raise GQAPruneError(
            f"--val_set_size {opts.val_set_size}: the data has only {n:,} records, so nothing would be left to "
            f"train on; use a smaller value (e.g. {max(1, n // 10):,}) or 0 for no validation split."
        )
    status, folder = "off", None
    if opts.cache_dataset:
        key, meta = _cache_key(opts, tokenizer, records)
        folder = Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
        folder = folder / key
        cached = _load_cache(folder)
        if cached is not None:
            train, val = cached
            log.info("loaded tokenised data from cache %s (%d train, %d val examples)", folder, len(train),
                     len(val) if val is not None else 0)
            return train, val, "hit", {"cache": str(folder), "dropped": None}
        status = "miss"
    train_idx, val_idx = split_indices(n, opts.val_set_size, opts.seed, opts.max_train_samples)
    kw = dict(cutoff_len=opts.cutoff_len, train_on_inputs=opts.train_on_inputs, add_eos_token=opts.add_eos_token)
    t0 = time.perf_counter()
    train, dropped = tokenize_records(records, train_idx, tokenizer, **kw)
    val, vdropped = tokenize_records(records, val_idx, tokenizer, **kw) if val_idx else (None, 0)
    if val is not None:
        val.is_train = False
    log.info("tokenised %d records in %.1f s (%d dropped: prompt longer than --cutoff_len %d)",
             len(train_idx) + len(val_idx), time.perf_counter() - t0, dropped + vdropped, opts.cutoff_len)
    if len(train) == 0:
        raise GQAPruneError(
            f"--data_path {opts.data_path}: no training example keeps a response token within --cutoff_len "
            f"{opts.cutoff_len}; raise --cutoff_len."
        )
    if val is not None and len(val) == 0:
        val = None
    if folder is not None:
        _save_cache(folder, train, val, meta)
        log.info("saved tokenised data to cache %s", folder)
    return train, val, status, {"cache": str(folder) if folder else None, "dropped": dropped + vdropped}


class PadCollator:
    """Right-pad a batch to its longest example (rounded up to a multiple of 8), or pack it.

    Padded: labels are padded with -100 and the attention mask marks real tokens.

    Packed (``pack=True``, padding-free): the batch's examples are concatenated into one
    row with ``position_ids`` restarting at 0 for each example and no attention mask.
    transformers reads the restarts as sequence boundaries: sdpa/eager get a block-diagonal
    causal mask, flash-attention its varlen kernel, so no token attends across examples.
    The first label of each example is set to -100, so the last token of one example is not
    trained to predict the first token of the next; unpacked, that label is never used either
    (the causal-LM loss shifts labels by one), so the loss is the same token for token.

    The record indices (``idx``) are taken out of the batch and, with ``sample_log``, appended
    to a per-process file so tests and users can check sharding and data order.
    """

    def __init__(self, pad_id: int, multiple: int = 8, sample_log: Path | None = None, pack: bool = False):
        self.pad_id, self.multiple, self.sample_log, self.pack = pad_id, multiple, sample_log, pack

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.sample_log is not None and features[0].get("train"):
            with open(self.sample_log, "a") as fh:
                fh.write(",".join(str(int(f["idx"])) for f in features) + "\n")
        if self.pack:
            return pack_examples([f["input_ids"] for f in features], [f["labels"] for f in features])
        n = max(len(f["input_ids"]) for f in features)
        n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            ids[row, :k] = torch.as_tensor(np.asarray(f["input_ids"], dtype=np.int64))
            labels[row, :k] = torch.as_tensor(np.asarray(f["labels"], dtype=np.int64))
            mask[row, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_examples(ids: list, labels: list) -> dict[str, torch.Tensor]:
    """Examples -> one packed row: ``input_ids``, ``labels``, ``position_ids``, each ``[1, total tokens]``.

    Positions restart at 0 per example (the boundary transformers detects); each example's
    first label is -100 (see PadCollator).
    """
    lens = [len(x) for x in ids]
    flat_ids = torch.as_tensor(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))
    flat_lab = torch.as_tensor(np.concatenate([np.asarray(x, dtype=np.int64) for x in labels]))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    flat_lab[torch.as_tensor(starts)] = -100
    pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])
    return {"input_ids": flat_ids[None], "labels": flat_lab[None], "position_ids": pos[None]}


# ------------------------------------------------------------------------------------------ model


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, int]:
    """(sum over loss tokens of KL(teacher || student) at temperature T, number of those tokens).

    The tokens are the causal-LM loss's: logits at position i predict label i + 1, and only
    positions whose next label is not -100 count. Both distributions are softmax(logits / T),
    computed in fp32 on the selected positions only (a [tokens, vocab] copy, not [batch, len, vocab]).
    Hinton's T^2 factor is NOT applied here; the caller scales the term.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise GQAPruneError(f"--distill_from: the teacher predicts {teacher_logits.shape[-1]} tokens, the student "
                            f"{student_logits.shape[-1]}; teacher and student must share one vocabulary")
    keep = labels[..., 1:] != -100
    n = int(keep.sum())
    if n == 0:
        return student_logits.sum() * 0.0, 0
    return _kl_sum(student_logits[..., :-1, :][keep], teacher_logits[..., :-1, :][keep], temperature), n


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows of KL(softmax(teacher / T) || softmax(student / T)), in fp32; rows = loss positions."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return torch.nn.functional.kl_div(s, t, reduction="sum", log_target=True)


def load_teacher(ref: str, student_tokenizer, student_config, *, dtype: torch.dtype, device: torch.device,
                 allow_pickle: bool = False):
    """The frozen teacher for --distill_from, in eval mode, in the student's precision, on its device.

    Refuses a teacher whose vocabulary (tokenizer and output size) differs from the student's:
    the KL compares the two distributions token id by token id.
    """
    from gqaprune.model_io import load_model

    try:
        teacher, ttok = load_model(ref, dtype=dtype, device=device, allow_pickle=allow_pickle)
    except GQAPruneError as e:
        raise GQAPruneError(str(e).replace("--model ", "--distill_from ", 1)) from e
    if ttok is not None and ttok.get_vocab() != student_tokenizer.get_vocab():
        raise GQAPruneError(
            f"--distill_from {ref}: its tokenizer differs from the student's ({len(ttok)} vs "
            f"{len(student_tokenizer)} tokens, or different ids); distillation compares token distributions id by "
            "id, so use a teacher with the student's tokenizer (the model it was pruned from)."
        )
    tv, sv = teacher.config.get_text_config().vocab_size, student_config.get_text_config().vocab_size
    if tv != sv:
        raise GQAPruneError(f"--distill_from {ref}: vocabulary size {tv}, the student's is {sv}; use the model the "
                            "student was pruned from")
    teacher.eval().requires_grad_(False)
    teacher.config.use_cache = False
    return teacher



def linear_module_names(model) -> list[str]:
    """Leaf names of every nn.Linear in the model (what --lora_target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_target_modules(model, targets: list[str]) -> None:
    if list(targets) == ["all-linear"]:
        return  # PEFT's shorthand: every Linear except the output head
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise GQAPruneError(
            f"--lora_target_modules: {', '.join(missing)} matches no Linear module of this model; the Linear "
            f"modules are: {', '.join(linear_module_names(model))}."
        )


def base_fingerprint(model, targets: list[str] | None = None) -> dict:
    """Shapes of the adapted Linear modules and a few weight statistics, to recognise the base later.

    Statistics are means of |w| in fp32, stable across bf16/fp32 loads to ~1e-3 relative.
    """
    shapes, stats = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (targets is None or any(name == t or name.endswith("." + t)
                                                                       for t in targets)):
            w = getattr(m, "base_layer", m).weight if hasattr(m, "base_layer") else m.weight
            shapes[name] = [int(w.shape[0]), int(w.shape[1])]
    named = dict(model.named_parameters())
    picks = [n for n in named if n.endswith("embed_tokens.weight")]
    picks += sorted(n for n in named if re.search(r"layers\.0\..*(q_proj|down_proj)\.(base_layer\.)?weight$", n))
    for n in picks:
        stats[re.sub(r"\.base_layer", "", n)] = float(named[n].detach().float().abs().mean())
    return {"model_type": getattr(model.config, "model_type", None),
            "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
            "shapes": shapes, "weight_abs_mean": stats}


# ------------------------------------------------------------------------------------- logging


def _to_float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def _rename_metric(k: str) -> str:
    if k == "loss":
        return "train/loss"
    if k == "learning_rate":
        return "learning_rate"
    if k == "grad_norm":
        return "train/grad_norm"
    if k == "distill_kl":
        return "train/distill_kl"
    if k == "distill_ce":
        return "train/lm_loss"
    if k == "train_loss":
        return "train/mean_loss"
    if k.startswith("eval_"):
        return "eval/" + k[5:]
    if k.startswith("train_"):
        return "train/" + k[6:]
    return k


class MetricsSink:
    """metrics.jsonl always; W&B and TensorBoard when asked. Rank 0 only."""

    def __init__(self, out_dir: Path, opts: FinetuneOptions, enabled: bool):
        self.path = out_dir / METRICS
        self.enabled = enabled
        self.wandb_run = None
        self.tb = None
        if not enabled:
            return
        if opts.wandb_project:
            self.wandb_run = _init_wandb(opts, out_dir)
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
            except Exception as e:  # noqa: BLE001
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


def _init_wandb(opts: FinetuneOptions, out_dir: Path):
    try:
        import wandb
    except ImportError:
        log.warning("--wandb_project given but wandb is not installed; logging to %s only (pip install wandb)",
                    out_dir / METRICS)
        return None
    if not os.environ.get("WANDB_MODE") and not _wandb_has_key():
        os.environ["WANDB_MODE"] = "offline"
        log.warning("W&B: no API key found; logging offline to %s/wandb (upload later with `wandb sync`)", out_dir)
    try:
        return wandb.init(project=opts.wandb_project, dir=str(out_dir), config=asdict(opts),
                          name=Path(opts.output_dir).name, job_type="lora-finetune")
    except Exception as e:  # noqa: BLE001 - network/auth problems must not stop training
        log.warning("W&B init failed (%s: %s); logging to %s only", type(e).__name__, e, out_dir / METRICS)
        return None


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss (train, val) and perplexity curves against the optimizer step, as a PNG."""
    if not metrics_path.is_file():
        return None
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    series: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        for k, v in r.items():
            if k in ("train/loss", "eval/loss") or (k.startswith("eval/") and k.endswith("_ppl")):
                f = _to_float(v)
                if f is not None and math.isfinite(f):
                    series.setdefault(k, []).append((int(r["step"]), f))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl_keys = sorted(k for k in series if k.endswith("_ppl"))
    ncols = 2 if ppl_keys else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    for k, style in (("train/loss", "-"), ("eval/loss", "o-")):
        if k in series:
            xs, ys = zip(*series[k])
            ax.plot(xs, ys, style, label=k, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("LoRA fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if ppl_keys:
        ax = axes[0][1]
        protos = {}
        for r in recs:
            for k in ppl_keys:
                if k + "_protocol" in r:
                    protos[k] = r[k + "_protocol"]
        for k in ppl_keys:
            xs, ys = zip(*series[k])
            p = protos.get(k)
            lab = k + (f" ({p['dataset']} {p['split']}, window {p['seq_len']}, stride {p['stride']}, "
                       f"{p['n_tokens']:,} tok)" if p else "")
            ax.plot(xs, ys, "o-", label=lab, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity during fine-tuning")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------- trainer


def _make_trainer_classes():
    """Trainer subclass and callbacks, built lazily so importing this module stays cheap."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class PPLTracker:
        """Pre-tokenised extra val corpora and the latest PPLResult of each."""

        def __init__(self, corpora: dict[str, str], tokenizer, opts: FinetuneOptions):
            from gqaprune.evaluate.perplexity import tokenize_corpus
            from gqaprune.data import load_text_corpus

            self.corpora, self.opts, self.tokenizer = corpora, opts, tokenizer
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
                res = perplexity(model, self.tokenizer, name, seq_len=self.opts.ppl_seq_len,
                                 max_tokens=self.opts.extra_val_max_tokens, batch_size=8, progress=False,
                                 ids=self.ids[key], split=self.splits[key])
                out[key] = res
                self.latest[key] = res
                self.first.setdefault(key, res)
            return out

    class LoRATrainer(Trainer):
        """Adds extra-corpus PPL to each evaluation, counts real tokens, stops on NaN/inf loss."""

        ppl_tracker: PPLTracker | None = None
        tokens_seen: int = 0        # real (non-pad) tokens fed forward in training
        positions_seen: int = 0     # all positions fed forward in training, padding included
        side_seconds: float = 0.0   # time in evaluation and checkpoint saving, kept out of tokens/s
        eval_collator = None        # evaluation batches are always padded: val loss comparable across runs
        teacher = None              # frozen teacher for distillation (None: plain LM loss)
        distill_alpha: float = 0.5
        distill_temperature: float = 2.0
        _distill_sums = None        # [KL sum, LM-loss sum, tokens] since the last log (this process)
        last_distill: dict | None = None

        def _get_eval_sampler(self, eval_dataset):
            # Evaluation batches do not follow --group_by_length (transformers groups them too when it is
            # on): the val loss is a mean of per-batch means, so it stays comparable across runs only if the
            # batches are the same.
            key = next((k for k in ("train_sampling_strategy", "group_by_length") if hasattr(self.args, k)), None)
            saved = getattr(self.args, key) if key else None
            if saved in ("group_by_length", True):
                setattr(self.args, key, "random" if key == "train_sampling_strategy" else False)
            try:
                return super()._get_eval_sampler(eval_dataset)
            finally:
                if key:
                    setattr(self.args, key, saved)

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
            labels = inputs["labels"]
            if packed:
                keep = labels[0, 1:] != -100
                idx = keep.nonzero()[:, 0]
                n = int(idx.numel())
                fwd = {k: v for k, v in inputs.items() if k != "labels"}
                outputs = model(**fwd, logits_to_keep=idx, use_cache=False)
                s_logits = outputs.logits[0]
                denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
                ce = torch.nn.functional.cross_entropy(s_logits.float(), labels[0, 1:][keep], reduction="sum")
                ce = ce / denom * scale
                if not distil:
                    return (ce, outputs) if return_outputs else ce
            else:
                ce, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            with torch.no_grad():
                # per micro-batch, no graph, no logit cache: teacher memory = one forward's activations
                t_in = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
                if packed:
                    t_logits = self.teacher(**t_in, logits_to_keep=idx, use_cache=False).logits[0]
                else:
                    t_logits = self.teacher(**t_in, use_cache=False).logits
            if packed:
                kl_sum = _kl_sum(s_logits, t_logits, self.distill_temperature)
            else:
                kl_sum, n = distillation_kl(outputs.logits, t_logits, labels, self.distill_temperature)
            del t_logits
            denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
            kl = kl_sum / denom * scale
            a, t2 = self.distill_alpha, self.distill_temperature ** 2
            loss = (1.0 - a) * ce + a * t2 * kl
            sums = self._distill_sums if self._distill_sums is not None else [0.0, 0.0, 0]
            d = float(denom) / scale
            sums[0] += float(kl_sum.detach())
            sums[1] += float(ce.detach()) * d
            sums[2] += n
            self._distill_sums = sums
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._distill_sums is not None and self._distill_sums[2] > 0:
                kl_sum, ce_sum, n = self._distill_sums
                logs["distill_kl"] = kl_sum / n    # KL(teacher || student) at temperature T, per token
                logs["distill_ce"] = ce_sum / n    # the plain LM loss, per token
                self.last_distill = {"kl": logs["distill_kl"], "ce": logs["distill_ce"]}
                self._distill_sums = None
            return super().log(logs, *args, **kwargs)

        def _save_checkpoint(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super()._save_checkpoint(*a, **kw)
            finally:
                self.side_seconds += time.perf_counter() - t0

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
            self.tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device)
            if self.args.world_size > 1:
                # Every process must stop together, or the others hang in the next all-reduce.
                bad = self.accelerator.reduce(bad, reduction="sum")
            if bad.item() > 0:
                step = self.state.global_step + 1
                raise _Diverged(step, float(loss.detach().float().cpu()))
            return loss

    class MetricsCallback(TrainerCallback):
        def __init__(self, sink: MetricsSink, tracker: PPLTracker | None):
            self.sink, self.tracker = sink, tracker

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            rec = {}
            for k, v in logs.items():
                if k in ("epoch", "step"):
                    continue
                f = _to_float(v)
                rec[_rename_metric(k)] = f if f is not None else v
                if k.endswith("_ppl") and self.tracker is not None:
                    key = k[len("eval_"):-len("_ppl")] if k.startswith("eval_") else None
                    res = self.tracker.latest.get(key)
                    if res is not None:
                        proto = res.to_dict()
                        proto.pop("ppl", None)
                        proto.pop("nll", None)
                        rec[_rename_metric(k) + "_protocol"] = proto
            self.sink.write(state.global_step, rec, logs.get("epoch", state.epoch))

    class EvalEvery(TrainerCallback):
        """Evaluate every ``eval_steps`` optimizer steps (val loss and/or extra PPL)."""

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

    return LoRATrainer, MetricsCallback, EvalEvery, PPLTracker, QuietProgress


def _graceful_stop():
    """A callback that turns the first Ctrl-C into "save a checkpoint after this optimizer step, then
    stop", so nothing since the last ``--save_steps`` checkpoint is lost; a second Ctrl-C stops at once.
    Single process only (under torchrun every rank gets the signal at a different point)."""
    import signal
    import sys

    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self):
            self.requested, self._prev = False, None

        def install(self):
            self._prev = signal.signal(signal.SIGINT, self._on_sigint)

        def uninstall(self):
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

    return GracefulStop()


class _Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss {loss} at optimizer step {step}")
        self.step, self.loss = step, loss


# ----------------------------------------------------------------------------------------- main


def _precision(opts: FinetuneOptions, device: torch.device) -> tuple[torch.dtype, str, bool, bool]:
    """(load dtype, description, Trainer bf16, Trainer fp16)."""
    if opts.fp16:
        if device.type != "cuda":
            raise GQAPruneError("--fp16: fp16 mixed precision needs a CUDA GPU; leave it out (fp32) on this device")
        return torch.float16, "fp16 base weights + fp16 autocast (asked for with --fp16)", False, True
    bf16 = opts.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise GQAPruneError("--bf16: this GPU does not support bf16; leave it out to train in fp32")
        return torch.bfloat16, "bf16 base weights + bf16 autocast, fp32 LoRA weights", True, False
    return torch.float32, "fp32", False, False


def _checkpointing_args(on: bool) -> dict:
    """TrainingArguments for activation (gradient) checkpointing; transformers 5.x renamed the field."""
    import dataclasses as dc

    from transformers import TrainingArguments

    names = {f.name for f in dc.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    # Non-reentrant checkpointing works with frozen base weights (no enable_input_require_grads hack).
    return {key: on, key + "_kwargs": {"use_reentrant": False} if on else None}


def _sampler_args(group_by_length: bool) -> dict:
    """TrainingArguments for the length-grouped sampler; transformers 5.x replaced the bool with a strategy."""
    import dataclasses as dc

    from transformers import TrainingArguments

    names = {f.name for f in dc.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def fused_kernel_plan(want: bool | None, device: torch.device) -> tuple[bool, str]:
    """(apply Liger kernels?, what to report). ``want``: True = required, False = off, None = where available."""
    import importlib.util

    if want is False:
        return False, "off (--no-fused-kernels)"
    installed = importlib.util.find_spec("liger_kernel") is not None
    if not installed or device.type != "cuda":
        why = "liger-kernel is not installed" if not installed else f"Liger kernels need CUDA, training on {device}"
        if want:
            raise GQAPruneError(f"--fused_kernels: {why}; leave the flag out (or pip install liger-kernel on a "
                                "CUDA machine).")
        return False, f"none ({why})"
    return True, "liger"


def _apply_fused_kernels(model, distill: bool) -> str:
    """Patch the (unwrapped) Llama model with Liger kernels; returns what was applied."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    # Fused linear + cross-entropy never materialises the logits; distillation needs them.
    kinds = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=not distill)
    apply_liger_kernel_to_llama(model=model, **kinds)
    return "liger (" + ", ".join(k for k, v in kinds.items() if v) + ")"


def _load_base(opts: FinetuneOptions, dtype: torch.dtype, device: torch.device):
    from gqaprune.model_io import load_model

    return load_model(opts.prune_model, dtype=dtype, device=device, allow_pickle=opts.allow_pickle)


def finetune(opts: FinetuneOptions, *, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune a pruned model with LoRA; write the adapter and the run's records to ``opts.output_dir``.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. early stopping).
    Raises GQAPruneError for bad input, TrainingDivergedError when the loss becomes NaN/inf.
    """
    world_size, rank, local_rank = _world()
    accum = _check_options(opts, world_size)
    extra = check_extra_val(opts.extra_val_dataset)
    resume = _resolve_resume(opts)
    decision = _check_output_dir(opts, resume)
    from gqaprune.model_io import resolve_device, resolve_model_ref

    try:
        resolve_model_ref(opts.prune_model)  # a missing model fails here, before data is read
    except GQAPruneError as e:
        raise GQAPruneError(str(e).replace("--model ", "--prune_model ", 1)) from e
    if opts.distill_from:
        try:
            resolve_model_ref(opts.distill_from)
        except GQAPruneError as e:
            raise GQAPruneError(str(e).replace("--model ", "--distill_from ", 1)) from e
    from gqaprune.data import load_instruction_records

    records = load_instruction_records(opts.data_path)
    if not records:
        raise GQAPruneError(f"--data_path {opts.data_path}: the data is empty")
    if opts.val_set_size >= len(records):
        raise GQAPruneError(
            f"--val_set_size {opts.val_set_size}: the data has only {len(records):,} records, so nothing would be "
            f"left to train on; use a smaller value (e.g. {max(1, len(records) // 10):,}) or 0 for no validation."
        )

    if world_size > 1 and torch.cuda.is_available() and (opts.device is None or opts.device.startswith("cuda")):
        device = torch.device("cuda", local_rank)
    else:
        device = resolve_device(opts.device if world_size == 1 else (opts.device or "cpu"))
    load_dtype, precision, use_bf16, use_fp16 = _precision(opts, device)
    gc = opts.gradient_checkpointing if opts.gradient_checkpointing is not None else device.type == "cuda"

    import transformers
    from transformers import TrainingArguments

    out = Path(opts.output_dir)
    resume_step = None
    if resume is not None:
        resume_step = int(json.loads((Path(resume) / "trainer_state.json").read_text()).get("global_step", 0))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=opts.micro_batch_size,
        per_device_eval_batch_size=opts.micro_batch_size,
        gradient_accumulation_steps=accum,
        num_train_epochs=opts.num_epochs,
        max_steps=opts.max_steps if opts.max_steps is not None else -1,
        learning_rate=opts.learning_rate,
        warmup_steps=opts.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        bf16=use_bf16,
        fp16=use_fp16,
        **_checkpointing_args(gc),
        **_sampler_args(opts.group_by_length),
        logging_steps=opts.logging_steps,
        logging_nan_inf_filter=False,      # we stop on NaN instead of hiding it
        eval_strategy="no",                # EvalEvery triggers evaluation, with or without a val split
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        report_to="none",                  # MetricsSink logs metrics.jsonl / W&B / TensorBoard itself
        seed=opts.seed,
        data_seed=opts.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        disable_tqdm=rank != 0,
    )
    is_main = args.process_index == 0
    log.info("global batch %d = micro batch %d x gradient accumulation %d x %d process(es)",
             opts.batch_size, opts.micro_batch_size, accum, world_size)

    model, tokenizer = _load_base(opts, load_dtype, device)
    if tokenizer is None:
        raise GQAPruneError(f"--prune_model {opts.prune_model}: no tokenizer was found with the model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    check_target_modules(model, opts.lora_target_modules)
    use_fused, fused_desc = fused_kernel_plan(opts.fused_kernels, device)
    teacher = None
    if opts.distill_from:
        teacher = load_teacher(opts.distill_from, tokenizer, model.config, dtype=load_dtype, device=device,
                               allow_pickle=opts.allow_pickle)
        log.info("distillation from %s: alpha %.3g, temperature %.3g (loss = alpha * T^2 * KL(teacher || student) "
                 "+ (1 - alpha) * LM loss)", opts.distill_from, opts.distill_alpha, opts.distill_temperature)
    if use_fused:
        try:
            fused_desc = _apply_fused_kernels(model, distill=teacher is not None)
        except Exception as e:  # noqa: BLE001 - an optional speed-up must not stop the run
            fused_desc = f"none (Liger failed: {type(e).__name__}: {e})"
            log.warning("fused kernels: %s", fused_desc)
    log.info("fused kernels: %s", fused_desc)

    with args.main_process_first(local=False, desc="tokenise data"):
        train_ds, val_ds, cache_status, _ = prepare_data(opts, tokenizer, records)
    log.info("data: %d train / %d val examples, %d train tokens", len(train_ds),
             len(val_ds) if val_ds is not None else 0, train_ds.n_tokens)

    # Inputs are good (model, tokenizer, data): only now does the output folder change.
    with args.main_process_first(local=False, desc="prepare output dir"):
        if is_main:
            _prepare_output_dir(opts, decision, resume_step)

    LoRATrainer, MetricsCallback, EvalEvery, PPLTracker, QuietProgress = _make_trainer_classes()
    tracker = PPLTracker(extra, tokenizer, opts) if extra and is_main else None

    from peft import LoraConfig, get_peft_model

    all_linear = list(opts.lora_target_modules) == ["all-linear"]
    fingerprint = base_fingerprint(model, None if all_linear else opts.lora_target_modules)
    transformers.set_seed(opts.seed)  # LoRA A init
    lora_cfg = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                          target_modules="all-linear" if all_linear else list(opts.lora_target_modules),
                          bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora_cfg)
    p = Path(opts.prune_model).expanduser()
    model.peft_config["default"].base_model_name_or_path = str(p.resolve()) if p.exists() else opts.prune_model
    n_train = sum(q.numel() for q in model.parameters() if q.requires_grad)
    n_all = sum(q.numel() for q in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)", opts.lora_r, opts.lora_alpha,
             ",".join(opts.lora_target_modules), f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(1, n_all))

    sink = MetricsSink(out, opts, enabled=is_main)
    sample_log = out / f"samples_rank{args.process_index}.txt" if opts.log_sample_ids else None
    if sample_log is not None and resume is None and sample_log.exists():
        sample_log.unlink()
    cbs = [MetricsCallback(sink, tracker)]
    eval_enabled = val_ds is not None or bool(extra)
    if eval_enabled:
        cbs.append(EvalEvery(opts.eval_steps))
    trainer = LoRATrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                          data_collator=PadCollator(tokenizer.pad_token_id, sample_log=sample_log,
                                                      pack=opts.packing),
                          processing_class=tokenizer, callbacks=cbs + list(callbacks or []))
    trainer.ppl_tracker = tracker
    if opts.packing:
        trainer.eval_collator = PadCollator(tokenizer.pad_token_id)
    if teacher is not None:
        trainer.teacher = teacher
        trainer.distill_alpha, trainer.distill_temperature = opts.distill_alpha, opts.distill_temperature
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)   # library code logs; it does not print dicts
    trainer.remove_callback(ProgressCallback)
    if is_main:
        trainer.add_callback(QuietProgress())
        sink.write(0 if resume_step is None else resume_step,
                   {"run/global_batch": opts.batch_size, "run/grad_accum": accum, "run/world_size": world_size,
                    "run/train_examples": len(train_ds), "run/precision": precision,
                    "run/resumed_from": resume})

    stopper = None
    if world_size == 1 and threading.current_thread() is threading.main_thread():
        stopper = _graceful_stop()
        trainer.add_callback(stopper)
    status, message, diverged = "completed", "", None
    t0 = time.perf_counter()
    train_start = side_start = side_end = None
    try:
        if stopper is not None:
            stopper.install()
        if eval_enabled and resume is None:
            trainer.evaluate()  # step 0: val loss and PPL before fine-tuning
        train_start, side_start = time.perf_counter(), trainer.side_seconds
        trainer.train(resume_from_checkpoint=resume)
        train_end, side_end = time.perf_counter(), trainer.side_seconds   # the final evaluation is not in the loop
        if stopper is not None and stopper.requested:
            ckpt = _last_ckpt(out)
            raise Interrupted(f"stopped at optimizer step {trainer.state.global_step}; checkpoint saved: {ckpt}",
                              checkpoint=ckpt)
        if eval_enabled and (opts.eval_steps == 0 or trainer.state.global_step % opts.eval_steps):
            trainer.evaluate()
    except _Diverged as e:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        status, diverged = "diverged", e
        message = (f"training stopped: the loss became {e.loss} at optimizer step {e.step}; no update was applied "
                   f"from that step. Last good checkpoint: {last or 'none (none was saved yet)'}. "
                   "Try a lower --learning_rate, or bf16/fp32 instead of --fp16, then resume with "
                   "--resume_from_checkpoint.")
        log.error(message)
        train_end, side_end = time.perf_counter(), trainer.side_seconds
    except BaseException:
        sink.close()  # an interrupted run still closes its W&B run and TensorBoard file
        raise
    finally:
        if stopper is not None:
            stopper.uninstall()
    wall_seconds = time.perf_counter() - t0
    # tokens/s counts the training loop only: evaluations and checkpoint saves inside it are subtracted.
    run_seconds = 1e-9
    if train_start is not None:
        run_seconds = max(train_end - train_start - (side_end - side_start), 1e-9)
    tokens = torch.tensor(float(trainer.tokens_seen), device=args.device)
    if world_size > 1 and diverged is None:
        tokens = trainer.accelerator.reduce(tokens, reduction="sum")
    tokens_seen = int(tokens.item())

    hist = trainer.state.log_history
    train_losses = [h["loss"] for h in hist if "loss" in h]
    eval_losses = [h["eval_loss"] for h in hist if "eval_loss" in h]
    ppl_before = {k: r.to_dict() for k, r in (tracker.first if tracker else {}).items()}
    if resume is not None and is_main:
        ppl_before = _ppl_at_step0(out / METRICS) or ppl_before
    ppl_after = {k: r.to_dict() for k, r in (tracker.latest if tracker else {}).items()}
    if diverged is not None:
        ppl_after = {}
    result = FinetuneResult(
        output_dir=str(out), adapter_dir=str(out), status=status, global_step=int(trainer.state.global_step),
        epoch=float(trainer.state.epoch or 0.0), world_size=world_size, grad_accum=accum, precision=precision,
        gradient_checkpointing=bool(gc),
        train_examples=len(train_ds), val_examples=len(val_ds) if val_ds is not None else 0,
        train_tokens=tokens_seen, train_seconds=round(float(run_seconds), 3),
        tokens_per_second=round(tokens_seen / run_seconds, 1), wall_seconds=round(wall_seconds, 3),
        final_train_loss=train_losses[-1] if train_losses else None,
        best_eval_loss=min(eval_losses) if eval_losses else _best_eval_from_metrics(out / METRICS),
        ppl_before=ppl_before, ppl_after=ppl_after, dataset_cache=cache_status, resumed_from=resume,
        metrics_path=str(out / METRICS), message=message,
        batching=" + ".join(b for b, on in (("length-grouped", opts.group_by_length), ("packed", opts.packing)) if on)
        or "padded",
        padding_fraction=round(1 - trainer.tokens_seen / trainer.positions_seen, 4) if trainer.positions_seen else 0.0,
        fused_kernels=fused_desc,
        distill=None if teacher is None else {
            "teacher": opts.distill_from, "alpha": opts.distill_alpha, "temperature": opts.distill_temperature,
            "last_kl": (trainer.last_distill or {}).get("kl"), "last_ce": (trainer.last_distill or {}).get("ce")},
    )
    if is_main:
        if diverged is None:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            unwrapped.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
            _atomic_write(out / ADAPTER_INFO, json.dumps(
                {"base_model": model.peft_config["default"].base_model_name_or_path,
                 "base_fingerprint": fingerprint, "lora_target_modules": list(opts.lora_target_modules),
                 "global_step": result.global_step}, indent=2))
        else:
            result.adapter_dir = ""
        sink.write(result.global_step, {"summary/tokens_per_second": result.tokens_per_second,
                                        "summary/status": status})
        sink.close()
        try:
            png = plot_curves(out / METRICS, out / PLOT)
            result.plot_path = str(png) if png else None
        except Exception as e:  # noqa: BLE001 - a failed plot must not lose the run
            log.warning("could not draw %s: %s", PLOT, e)
        _atomic_write(out / SUMMARY, json.dumps(result.to_dict(), indent=2))
    if diverged is not None:
        raise TrainingDivergedError(message, diverged.step, _last_ckpt(out))
    return result


def _last_ckpt(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out)) if out.is_dir() else None


def _ppl_at_step0(metrics_path: Path) -> dict[str, dict]:
    """PPL before fine-tuning, from a resumed run's metrics.jsonl (its step-0 evaluation)."""
    out = {}
    if not metrics_path.is_file():
        return out
    for ln in metrics_path.read_text().splitlines():
        r = json.loads(ln) if ln.strip() else {}
        if r.get("step") != 0:
            continue
        for k, v in r.items():
            if k.startswith("eval/") and k.endswith("_ppl") and k + "_protocol" in r:
                out[k[5:-4]] = dict(r[k + "_protocol"], ppl=v)
    return out


def _best_eval_from_metrics(metrics_path: Path) -> float | None:
    if not metrics_path.is_file():
        return None
    vals = [json.loads(ln).get("eval/loss") for ln in metrics_path.read_text().splitlines() if ln.strip()]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return min(vals) if vals else None


__all__ = ["FinetuneOptions", "FinetuneResult", "TrainingDivergedError", "finetune", "grad_accumulation",
           "tokenize_records", "prepare_data", "plot_curves", "base_fingerprint", "linear_module_names",
           "DEFAULT_TARGET_MODULES", "PadCollator", "pack_examples", "distillation_kl", "load_teacher",
           "fused_kernel_plan"]
