"""benchmarks/peers.py: the Torch-Pruning wrapper the SmolLM2 benchmark compares against.

What is checked is what the benchmark reports about Torch-Pruning: its parameter-count
prediction (used to match gqaprune's budget) equals the real count, it keeps every KV
head and so changes Q:KV, the model still runs after the attribute fix, and failures
come back as text instead of exceptions.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model, make_tokenizer

pytest.importorskip("torch_pruning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

# Q:KV = 3 like SmolLM2 (9 query heads over 3 KV heads), tied embeddings.
SHAPE = dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72, head_dim=8, intermediate_size=96,
             tie_word_embeddings=True)


@pytest.fixture(scope="module")
def eager_model():
    return make_tiny_model(attn_implementation="eager", **SHAPE)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_tp_prunes_keeps_kv_heads_and_matches_prediction(eager_model, importance):
    x = torch.randint(3, 300, (1, 12))
    grads = peers.taylor_grads(copy.deepcopy(eager_model), torch.randint(3, 300, (4, 12)), 2) \
        if importance == "taylor" else None
    before = sum(p.numel() for p in eager_model.parameters())
    model, out = peers.tp_prune(copy.deepcopy(eager_model), x, importance, 0.3, grads=grads)
    assert out.ok, out.error
    assert out.runs == "ok"
    assert out.params == out.predicted_params == sum(p.numel() for p in model.parameters())
    assert out.params < before
    assert out.retied and model.lm_head.weight is model.get_input_embeddings().weight
    assert out.kv_heads == [3, 3]                       # every KV head kept ...
    assert out.q_heads == [6, 6]                        # ... query heads cut: Q:KV 3 -> 2
    assert out.q_per_kv() == [2.0, 2.0]
    assert out.hidden < SHAPE["hidden_size"]            # the hidden size is pruned too
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    logits = model(input_ids=x).logits
    assert logits.shape == (1, 12, 320) and torch.isfinite(logits).all()


def test_choose_ratio_hits_target():
    cfg = make_tiny_model(**SHAPE).config
    full = peers.predicted_params(cfg, 0.0)
    r = peers.choose_ratio(cfg, int(full * 0.7))
    got = peers.predicted_params(cfg, r)
    # the nearest the knob's granularity allows: within one step of every alternative
    assert all(abs(got - full * 0.7) <= abs(peers.predicted_params(cfg, q / 100) - full * 0.7) for q in range(1, 95))


def test_save_reload_reports_text(eager_model, tmp_path):
    x = torch.randint(3, 300, (1, 12))
    model, out = peers.tp_prune(copy.deepcopy(eager_model), x, "magnitude", 0.3)
    status = peers.save_reload(model, make_tokenizer(), tmp_path / "tp", x)
    assert isinstance(status, str) and status  # "ok (...)" or the failure, never an exception


def test_failure_is_recorded_not_raised(eager_model):
    x = torch.randint(3, 300, (1, 12))
    _, out = peers.tp_prune(copy.deepcopy(eager_model), x, "taylor", 0.3, grads=None)
    assert not out.ok and "gradients" in out.error
    status = peers.trace_failure_sdpa(eager_model, x, 0.3)
    assert isinstance(status, str)
