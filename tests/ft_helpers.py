"""Helpers for the fine-tuning / merge tests: a per-layer tiny checkpoint and tiny instruction data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from conftest import make_tiny_model, make_tokenizer, tiny_config

WORDS = ("the quick brown fox jumps over the lazy dog grouped query attention shares one key and value "
         "head among several query heads pruning removes whole groups").split()


def make_per_layer_model(seed: int = 0, kv=(1, 2), inter=(48, 128)):
    """GQAPrunedLlamaForCausalLM from tiny_config: layer 0 keeps 1 KV group and 48 MLP channels."""
    from gqaprune.models.pruned_llama import GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM

    cfg = GQAPrunedLlamaConfig(**tiny_config().to_dict())
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
