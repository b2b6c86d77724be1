"""Invariants of pruning (docs/architecture.md, "Invariants the tests hold"): structure, plan, surgery, checkpoints."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import make_tiny_model
from gqaprune.models.io import load_model, save_checkpoint
from gqaprune.prune.score import score_units
from gqaprune.prune.budget import Budget
from gqaprune.prune.plan import PrunePlan, make_plan
from gqaprune.models.layout import count_params, model_layout
from gqaprune.prune.surgery import apply_plan

X = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def calib_ids(n=8, L=16):
    return torch.randint(3, 320, (n, L), generator=torch.Generator().manual_seed(2))


def keep_all_plan(layout):
    return PrunePlan("uniform", [list(range(s.n_kv)) for s in layout.layers],
                     [list(range(s.n_mlp)) for s in layout.layers],
                     make_plan(layout, [{"kv": torch.ones(s.n_kv), "mlp": torch.ones(s.n_mlp)} for s in layout.layers],
                               Budget(ratio=0.1).resolve(layout)).source_shape)


def test_keep_all_plan_gives_identical_logits(tiny_model):
    ref = logits(tiny_model)
    out = apply_plan(copy.deepcopy(tiny_model), keep_all_plan(model_layout(tiny_model)))
    assert torch.equal(logits(out), ref)


def test_removing_zeroed_units_gives_identical_logits(tiny_model):
    """Zero the o_proj columns of KV group 1 and down_proj column 5 in layer 0: removing them changes nothing."""
    lay = model_layout(tiny_model)
    r, d = lay.q_per_kv, lay.head_dim
    m = copy.deepcopy(tiny_model)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight[:, 1 * r * d:2 * r * d] = 0
        m.model.layers[0].mlp.down_proj.weight[:, 5] = 0
        m.model.layers[1].mlp.down_proj.weight[:, [7, 9]] = 0
    ref = logits(m)
    plan = keep_all_plan(lay)
    plan.kv_groups[0] = [0]
    plan.mlp_channels[0] = [c for c in range(128) if c != 5]
    plan.mlp_channels[1] = [c for c in range(128) if c not in (7, 9)]
    pruned = apply_plan(m, plan)
    assert pruned.model.layers[0].self_attn.k_proj.out_features == d
    assert torch.allclose(logits(pruned), ref, atol=1e-5)
    # ...and removing a unit that is NOT zeroed does change the output (the test can fail).
    plan2 = keep_all_plan(lay)
    plan2.kv_groups[0] = [1]
    assert not torch.allclose(logits(apply_plan(copy.deepcopy(tiny_model), plan2)), logits(tiny_model), atol=1e-3)


@pytest.mark.parametrize("layout_kind", ["uniform", "per-layer"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_ratio_budget_and_gqa_ratio(tiny_model, layout_kind, ratio):
    lay = model_layout(tiny_model)
    scores = score_units(tiny_model, lay, "taylor", calib_ids(), batch_size=4, progress=False)
    plan = make_plan(lay, scores, Budget(ratio=ratio).resolve(lay), layout_kind=layout_kind)
    pruned = apply_plan(copy.deepcopy(tiny_model), plan)
    n = count_params(pruned)
    assert n == plan.provenance["params_after"]
    # nearest the unit granularity allows: within one KV group per layer of the target
    assert abs(n - lay.total_params * (1 - ratio)) <= lay.group_params * lay.num_layers
    new = model_layout(pruned)
    assert new.q_per_kv == lay.q_per_kv == 4
    for layer in pruned.model.layers:
        assert layer.self_attn.q_proj.out_features == 4 * layer.self_attn.k_proj.out_features
    assert logits(pruned).shape == logits(tiny_model).shape


def test_target_params_accuracy(tiny_model):
    lay = model_layout(tiny_model)
    scores = score_units(tiny_model, lay, "magnitude", None)
    for target in (90_000, 70_000, 60_000):
        plan = make_plan(lay, scores, Budget(target_params=target).resolve(lay))
        got = count_params(apply_plan(copy.deepcopy(tiny_model), plan))
        # MLP channels absorb the remainder: within one channel per layer
        assert abs(got - target) <= lay.channel_params * lay.num_layers, (target, got)


def test_hook_path_equals_plain_path(tiny_model):
    lay = model_layout(tiny_model)
    for crit in ("taylor", "taylor-vector", "taylor-second"):
        a = score_units(tiny_model, lay, crit, calib_ids(), batch_size=4, hooks=True, progress=False)
        b = score_units(tiny_model, lay, crit, calib_ids(), batch_size=4, hooks=False, progress=False)
        for x, y in zip(a, b):
            assert torch.allclose(x["kv"], y["kv"], rtol=1e-6) and torch.allclose(x["mlp"], y["mlp"], rtol=1e-6)
    # no gradients left behind, requires_grad restored
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_criteria_all_run_and_differ(tiny_model):
    lay = model_layout(tiny_model)
    seen = {}
    for crit in ("taylor", "taylor-vector", "taylor-second", "magnitude", "activation", "random"):
        s = score_units(tiny_model, lay, crit, calib_ids(), batch_size=4, progress=False)
        assert len(s) == 2 and s[0]["kv"].shape == (2,) and s[0]["mlp"].shape == (128,)
        assert torch.isfinite(s[0]["mlp"]).all() and (s[0]["mlp"] >= 0).all()
        seen[crit] = s[1]["mlp"]
    assert not torch.allclose(seen["taylor"], seen["magnitude"])


def test_plan_json_round_trip_and_replay(tiny_model, tmp_path):
    lay = model_layout(tiny_model)
    scores = score_units(tiny_model, lay, "taylor", calib_ids(), batch_size=4, progress=False)
    plan = make_plan(lay, scores, Budget(ratio=0.3).resolve(lay), layout_kind="per-layer", provenance={"criterion": "taylor"})
    plan.save(tmp_path / "plan.json")
    again = PrunePlan.load(tmp_path / "plan.json")
    assert again == plan
    a = apply_plan(copy.deepcopy(tiny_model), plan)
    b = apply_plan(copy.deepcopy(tiny_model), again)
    assert torch.equal(logits(a), logits(b))


RELOAD = textwrap.dedent("""
    import sys, json, torch
    from transformers import AutoModelForCausalLM
    path, remote = sys.argv[1], sys.argv[2] == "1"
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, dtype=torch.float32).eval()
    assert "gqaprune" not in sys.modules, "must not import gqaprune"
    x = torch.tensor(json.loads(sys.argv[3]))
    with torch.no_grad():
        print(json.dumps({"cls": type(m).__name__, "logits": m(input_ids=x).logits.tolist()}))
""")


def reload_in_fresh_process(path, remote: bool):
    out = subprocess.run([sys.executable, "-c", RELOAD, str(path), "1" if remote else "0", json.dumps(X.tolist())],
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["cls"], torch.tensor(d["logits"])


@pytest.mark.parametrize("layout_kind,kv,expect_cls", [
    ("uniform", None, "LlamaForCausalLM"),
    ("per-layer", [[0], [0, 1]], "GQAPrunedLlamaForCausalLM"),
])
def test_saved_checkpoint_reloads_in_fresh_process(tiny_model, tokenizer, tmp_path, layout_kind, kv, expect_cls):
    lay = model_layout(tiny_model)
    scores = score_units(tiny_model, lay, "magnitude", None)
    plan = make_plan(lay, scores, Budget(ratio=0.3).resolve(lay), layout_kind=layout_kind)
    if kv:  # force different head counts per layer
        plan.kv_groups = kv
        plan.mlp_channels = [list(range(100)), list(range(60))]
    pruned = apply_plan(copy.deepcopy(tiny_model), plan)
    out = save_checkpoint(pruned, tokenizer, tmp_path / "ckpt", plan=plan.to_dict())
    cls, got = reload_in_fresh_process(out, remote=layout_kind == "per-layer")
    assert cls == expect_cls
    assert (got - logits(pruned)).abs().max() < 1e-4
    # and in-process through gqaprune's loader (registered Auto class, no trust_remote_code)
    m2, _ = load_model(str(out))
    assert (logits(m2) - logits(pruned)).abs().max() < 1e-4
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "temporary folder left behind"


def test_awkward_head_count_saves_as_stock_mistral(tokenizer, tmp_path):
    """12 query / 4 KV heads (r=3), hidden 96: keeping 3 groups = 9 heads, 96 % 9 != 0."""
    m = make_tiny_model(hidden_size=96, num_attention_heads=12, num_key_value_heads=4, head_dim=8)
    lay = model_layout(m)
    plan = keep_all_plan(lay)
    plan.kv_groups = [[0, 2, 3], [1, 2, 3]]
    pruned = apply_plan(copy.deepcopy(m), plan)
    assert type(pruned).__name__ == "MistralForCausalLM"
    assert pruned.config.num_attention_heads == 9 and pruned.config.head_dim == 8
    out = save_checkpoint(pruned, tokenizer, tmp_path / "mistral")
    cls, got = reload_in_fresh_process(out, remote=False)
    assert cls == "MistralForCausalLM"
    assert (got - logits(pruned)).abs().max() < 1e-4
    # Mistral's math is Llama's: equal to slicing the Llama weights by hand
    ref = copy.deepcopy(m)
    from gqaprune.prune.surgery import slice_in_place
    slice_in_place(ref, plan)
    assert (logits(ref) - logits(pruned)).abs().max() < 1e-5


def test_save_is_atomic_on_failure(tiny_model, tokenizer, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


def test_legacy_pickle_needs_opt_in(tiny_model, tokenizer, tmp_path):
    from gqaprune.errors import GQAPruneError

    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": tiny_model, "tokenizer": tokenizer}, path)
    with pytest.raises(GQAPruneError, match="allow-pickle"):
        load_model(str(path))
    m, tok = load_model(str(path), allow_pickle=True)
    assert torch.equal(logits(m), logits(tiny_model))
    assert tok is not None


def test_mha_model_each_head_is_a_group(tokenizer):
    m = make_tiny_model(num_attention_heads=8, num_key_value_heads=8)
    lay = model_layout(m)
    assert lay.q_per_kv == 1 and lay.layers[0].n_kv == 8
    plan = make_plan(lay, score_units(m, lay, "magnitude", None), Budget(ratio=0.3).resolve(lay))
    pruned = apply_plan(m, plan)
    assert pruned.config.num_attention_heads == pruned.config.num_key_value_heads


def test_chunked_calibration_loss_matches_the_models_own_loss_and_gradients():
    """The calibration loss projects onto the vocabulary a few positions at a time (memory); the
    loss and every projection's gradient must equal ``model(labels=x).loss``'s."""
    from gqaprune.prune.score.taylor import causal_lm_loss as _loss

    model = make_tiny_model(seed=3)
    x = torch.randint(0, model.config.vocab_size, (3, 11))
    ref = model(input_ids=x, labels=x, use_cache=False).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = _loss(model, x, chunk_tokens=7)  # 30 positions: chunks of 7, 7, 7, 7, 2
    got.backward()
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
    for n, g in ref_grads.items():
        assert torch.allclose(dict(model.named_parameters())[n].grad, g, atol=1e-6, rtol=1e-5), n
