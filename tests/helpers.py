"""Test helpers shared by every test module (tests mirror src/: tests/prune/, tests/recover/, ...).

Tiny model (docs/architecture.md): 2 layers, hidden 64, 8 query heads, 2 KV heads (Q:KV 4),
head_dim 8, MLP 128; a byte-level BPE tokenizer of 320 tokens; a per-layer checkpoint; tiny
instruction data and text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "### Instruction: ### Input: ### Response: "
    "Grouped query attention shares one key and value head among several query heads. "
    "Pruning removes whole groups so that every layer keeps its ratio. 0123456789 "
)


def make_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained in milliseconds on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


def tiny_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    # Random init leaves all biases/norms at defaults; perturb norms so that
    # tests notice a wrongly sliced or dropped norm weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# family -> (transformers config class, overrides of FAMILY_BASE): tiny models of every supported family, each
# with what makes its family differ (docs/architecture.md, "Families"): Mistral's sliding window, Qwen2's q/k/v
# biases, Qwen3's q_proj wider than hidden and its q/k norms, Gemma's sandwich norms, soft-capping and
# sliding-window and global layers, Phi-3's fused qkv_proj / gate_up_proj
FAMILY_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"num_attention_heads": 8, "num_key_value_heads": 4}),
    "gemma2": ("Gemma2Config", {"query_pre_attn_scalar": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0, "tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", {"query_pre_attn_scalar": 16, "sliding_window": 8, "tie_word_embeddings": True,
                                         "num_hidden_layers": 6}),   # 5 sliding layers, then a global one
    "phi3": ("Phi3Config", {}),
}


def make_family_model(family: str, seed: int = 0, **overrides):
    """A tiny random causal LM of ``family`` with perturbed norms and biases (so a mis-sliced one shows)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kw = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, cls_name)(**{**FAMILY_BASE, **kw, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


WORDS = ("the quick brown fox jumps over the lazy dog grouped query attention shares one key and value "
         "head among several query heads pruning removes whole groups").split()


def make_per_layer_model(seed: int = 0, kv=(1, 2), inter=(48, 128)):
    """GQAPrunedLlamaForCausalLM from tiny_config: layer 0 keeps 1 KV group and 48 MLP channels."""
    from gqaprune.models.pruned_gqa import GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM

    cfg = GQAPrunedLlamaConfig(**tiny_config(num_hidden_layers=len(kv)).to_dict())
    cfg.kv_heads_per_layer = list(kv)
    cfg.intermediate_size_per_layer = list(inter)
    torch.manual_seed(seed)
    model = GQAPrunedLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_per_layer(path: Path, seed: int = 0, **kw) -> Path:
    from gqaprune.models.io import save_checkpoint

    return save_checkpoint(make_per_layer_model(seed, **kw), make_tokenizer(), path)


def save_dense(path: Path, seed: int = 0) -> Path:
    model, tok = make_tiny_model(seed), make_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_records(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Alpaca-format jsonl; every other record has an input."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            rec = {"instruction": " ".join(rng.choices(WORDS, k=4)),
                   "input": " ".join(rng.choices(WORDS, k=3)) if i % 2 else "",
                   "output": " ".join(rng.choices(WORDS, k=8))}
            fh.write(json.dumps(rec) + "\n")
    return path


def write_text(path: Path, n_words: int = 1500, seed: int = 1) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choices(WORDS, k=n_words)))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}


def finetune_options(tmp_path: Path, base, data, **kw):
    """FinetuneOptions for a two-step run of a tiny model on tiny data (kw override the defaults)."""
    from gqaprune.recover.options import FinetuneOptions

    d = dict(prune_model=str(base), data_path=str(data), output_dir=str(tmp_path / "out"), batch_size=4,
             micro_batch_size=2, val_set_size=8, max_steps=2, eval_steps=2, save_steps=2, logging_steps=1,
             cutoff_len=192, learning_rate=1e-3, warmup_steps=0, cache_dir=str(tmp_path / "cache"), seed=0)
    d.update(kw)
    return FinetuneOptions(**d)


def kill_at_step(step: int):
    """A Trainer callback that raises KeyboardInterrupt when optimizer step ``step`` ends (a simulated kill)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise KeyboardInterrupt(f"simulated kill at step {step}")

    return Kill()


def prune_args(src, out, calib, *extra):
    """``gqaprune prune`` arguments for a tiny model with a small local calibration file; recipe ``fast`` (the
    seed guide's Taylor + uniform, seconds) unless ``extra`` names a recipe or replays a plan."""
    recipe = [] if "--plan" in extra or "--recipe" in extra else ["--recipe", "fast"]
    return ["prune", "--model", str(src), "--output", str(out), "--calibration", str(calib),
            "--num-samples", "4", "--seq-len", "16", "--calib-batch-size", "2", *recipe, *extra]


LOADERS = ("gqaprune.models.io", "gqaprune.prune.command", "gqaprune.recover.merge", "gqaprune.recover.finetune",
           "gqaprune.recover.distill", "gqaprune.models.adapters", "gqaprune.bench.command", "gqaprune.check")


def patch_load_model(monkeypatch, fake) -> None:
    """Replace ``load_model`` everywhere it is bound. Every module is imported first: one imported while
    patched would bind the fake for good."""
    import importlib

    mods = [importlib.import_module(m) for m in LOADERS]
    for m in mods:
        if hasattr(m, "load_model"):
            monkeypatch.setattr(m, "load_model", fake)
