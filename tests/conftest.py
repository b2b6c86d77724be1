"""Shared fixtures: tiny random Llama models and a tiny tokenizer, all offline.

Tiny model (docs/architecture.md): 2 layers, hidden 64, 8 query heads, 2 KV heads (Q:KV 4),
head_dim 8, MLP 128. Seconds per test, no network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GQAPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "### Instruction: ### Input: ### Response: "
    "Grouped query attention shares one key and value head among several query heads. "
    "Pruning removes whole groups so that every layer keeps its ratio. 0123456789 "
)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def tiny_dir(tmp_path, tiny_model, tokenizer):
    """A tiny dense model saved as a Hugging Face folder."""
    out = tmp_path / "tiny_dense"
    tiny_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}; set GQAPRUNE_DATA_DIR")
    return SHARED_DATA


@pytest.fixture
def data_env(monkeypatch, shared_data):
    monkeypatch.setenv("GQAPRUNE_DATA_DIR", str(shared_data))
    return shared_data


@pytest.fixture
def offline_single_process(monkeypatch, tmp_path):
    """No Hub, a private dataset cache, and no torchrun variables leaking in from the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GQAPRUNE_CACHE_DIR", str(tmp_path / "cache_env"))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
