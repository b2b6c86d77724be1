"""Sensitivity-aware per-layer allocation (--allocation sensitivity) on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import make_tiny_model
from gqaprune.errors import GQAPruneError
from gqaprune.prune.score import score_units
from gqaprune.prune.budget import Budget
from gqaprune.prune.plan import PrunePlan, make_plan
from gqaprune.prune.command import PruneOptions, prune_model
from gqaprune.prune.allocate.sensitivity import layer_sensitivity, sensitivity_weights
from gqaprune.models.layout import count_params, model_layout
from gqaprune.prune.surgery import apply_plan

CALIB = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(3))


def _loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_sensitivity_is_the_measured_loss_rise():
    m = make_tiny_model(num_hidden_layers=3)
    lay = model_layout(m)
    scores = score_units(m, lay, "magnitude", None)
    target = Budget(ratio=0.3).resolve(lay)
    removed, pruned = target.removed, list(target.pruned)
    rep = layer_sensitivity(m, lay, scores, CALIB, removed, pruned, batch_size=4, progress=False)
    assert abs(rep["base_loss"] - _loss(m, CALIB)) < 1e-4
    # recompute layer 1's probe by slicing its lowest-scored units away for real
    x = rep["layers"][1]
    plan = make_plan(lay, scores, Budget(ratio=0.01).resolve(lay))  # any plan for the shape; replaced below
    plan.kv_groups = [list(range(s.n_kv)) for s in lay.layers]
    plan.mlp_channels = [list(range(s.n_mlp)) for s in lay.layers]
    kv_order = torch.argsort(scores[1]["kv"].double(), stable=True)
    mlp_order = torch.argsort(scores[1]["mlp"].double(), stable=True)
    plan.kv_groups[1] = sorted(kv_order[x["probe_kv_removed"]:].tolist())
    plan.mlp_channels[1] = sorted(mlp_order[x["probe_mlp_removed"]:].tolist())
    cut = apply_plan(copy.deepcopy(m), plan)
    assert abs(x["loss"] - _loss(cut, CALIB)) < 1e-4 and abs(x["delta"] - (x["loss"] - rep["base_loss"])) < 1e-9
    with torch.no_grad():
        p = torch.log_softmax(m(input_ids=CALIB).logits[:, :-1].float(), -1)
        q = torch.log_softmax(cut(input_ids=CALIB).logits[:, :-1].float(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert x["kl"] > 0 and abs(x["kl"] - kl) < 1e-5
    assert x["probe_mlp_removed"] > 0
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), make_tiny_model(num_hidden_layers=3)
                                                  .state_dict().values())), "probing must not modify weights"


def test_weights_are_bounded_sqrt_of_relative_kl():
    rep = {"layers": [{"layer": 0, "kl": 0.4}, {"layer": 1, "kl": 0.5}, {"layer": 2, "kl": 0.3}]}
    w = sensitivity_weights(rep)
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(1.25 ** 0.5) and w[2] == pytest.approx(0.75 ** 0.5)
    rep = {"layers": [{"layer": 0, "kl": 0.01}, {"layer": 1, "kl": 0.0}, {"layer": 2, "kl": 0.0},
                      {"layer": 3, "kl": 0.0}, {"layer": 4, "kl": 3.0}]}
    w = sensitivity_weights(rep)
    assert w[0] == 0.5 and w[1] == 0.5     # a layer that barely reacts is pruned at most twice the average
    assert w[4] == 2.0                     # and the most sensitive one at least half of it


def test_sensitivity_allocation_meets_budget_and_records_provenance(tiny_model):
    m = make_tiny_model(num_hidden_layers=4)
    lay = model_layout(m)
    o = PruneOptions(recipe="fast", pruning_ratio=0.3, criterion="taylor", layout="per-layer", allocation="sensitivity",
                     sensitivity_samples=4, calib_batch_size=4)
    pruned, plan = prune_model(copy.deepcopy(m), o, CALIB, progress=False)
    prov = plan.provenance
    sens = prov["sensitivity"]
    assert prov["allocation"] == "sensitivity" and sens["samples"] == 4 and sens["tokens"] == 4 * 32
    assert [x["layer"] for x in sens["layers"]] == [0, 1, 2, 3]
    assert all({"kl", "delta", "weight", "loss", "probe_kv_removed", "probe_mlp_removed"} <= set(x)
               for x in sens["layers"])
    assert count_params(pruned) == prov["params_after"]
    # same budget accuracy as the plain per-layer plan
    assert abs(prov["params_after"] - lay.total_params * 0.7) <= lay.group_params * lay.num_layers
    # provenance survives JSON (no integer keys) and the plan replays
    again = PrunePlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert torch.equal(apply_plan(copy.deepcopy(m), again)(input_ids=CALIB[:1]).logits,
                       pruned(input_ids=CALIB[:1]).logits)


def test_weights_shift_the_allocation():
    m = make_tiny_model(num_hidden_layers=2)
    lay = model_layout(m)
    scores = score_units(m, lay, "magnitude", None)
    base = make_plan(lay, scores, Budget(ratio=0.3).resolve(lay), layout_kind="per-layer")
    even = make_plan(lay, scores, Budget(ratio=0.3).resolve(lay), layout_kind="per-layer", layer_weights={0: 1.0, 1: 1.0})
    assert even.kept_mlp[0] == even.kept_mlp[1]          # equal weights, equal layers: equal shares
    heavy0 = make_plan(lay, scores, Budget(ratio=0.3).resolve(lay), layout_kind="per-layer", layer_weights={0: 2.0, 1: 0.5})
    rm0, rm1 = 128 - heavy0.kept_mlp[0], 128 - heavy0.kept_mlp[1]
    assert abs(rm1 - 4 * rm0) <= 4                       # removal in proportion to size / weight
    assert heavy0.provenance["params_after"] == base.provenance["params_after"]
    # within a layer the scores still choose: the kept channels are the layer's top-scored ones
    top = sorted(torch.argsort(scores[0]["mlp"], descending=True, stable=True)[:heavy0.kept_mlp[0]].tolist())
    assert heavy0.mlp_channels[0] == top


def test_sensitivity_needs_per_layer_layout(tiny_model):
    with pytest.raises(GQAPruneError, match="per-layer"):   # refused when the options are built
        PruneOptions(recipe="fast", pruning_ratio=0.3, allocation="sensitivity", layout="uniform")
    lay = model_layout(tiny_model)
    with pytest.raises(GQAPruneError, match="per-layer"):
        make_plan(lay, score_units(tiny_model, lay, "magnitude", None), Budget(ratio=0.3).resolve(lay), layer_weights={0: 1.0})


def test_assign_by_weights_caps_and_redistributes():
    from gqaprune.prune.budget import _assign_by_weights

    sizes, floors = {0: 100, 1: 100, 2: 100}, {0: 1, 1: 1, 2: 1}
    rm = _assign_by_weights(sizes, floors, 150, {0: 0.5, 1: 1.0, 2: 2.0})
    assert sum(rm.values()) == 150 and rm[0] > rm[1] > rm[2]
    assert abs(rm[0] / rm[2] - 4) < 0.1
    rm = _assign_by_weights(sizes, floors, 280, {0: 0.5, 1: 1.0, 2: 2.0})   # layer 0 hits its floor
    assert sum(rm.values()) == 280 and rm[0] == 99 and rm[1] > rm[2]
    rm = _assign_by_weights({0: 3, 1: 3, 2: 3}, {0: 1, 1: 1, 2: 1}, 2, {0: 2.0, 1: 1.0, 2: 0.5})  # KV granularity
    assert rm == {0: 0, 1: 1, 2: 1} or rm == {0: 0, 1: 0, 2: 2}


@pytest.mark.parametrize("layout_kind", ["uniform", "per-layer"])
def test_kv_fraction_sets_the_split(layout_kind):
    m = make_tiny_model(num_key_value_heads=4, num_attention_heads=8)
    lay = model_layout(m)
    scores = score_units(m, lay, "magnitude", None)
    for f, kv_kept in ((0.0, 8), (0.25, 6), (0.5, 4)):
        plan = make_plan(lay, scores, Budget(ratio=0.3).resolve(lay), layout_kind=layout_kind, kv_fraction=f)
        assert sum(plan.kept_kv) == kv_kept
        assert abs(plan.provenance["params_after"] - lay.total_params * 0.7) <= lay.channel_params * lay.num_layers
    with pytest.raises(GQAPruneError):   # removing 3 of 4 groups per layer overshoots a 5% budget
        make_plan(lay, scores, Budget(ratio=0.05).resolve(lay), layout_kind=layout_kind, kv_fraction=0.75)


def test_split_search_keeps_the_least_disturbing_plan():
    m = make_tiny_model(num_key_value_heads=4, num_attention_heads=8, num_hidden_layers=2)
    lay = model_layout(m)
    o = PruneOptions(recipe="fast", pruning_ratio=0.3, criterion="taylor", split="search", sensitivity_samples=4, calib_batch_size=4)
    pruned, plan = prune_model(copy.deepcopy(m), o, CALIB, progress=False)
    rep = plan.provenance["split_search"][0]
    cands = [c for c in rep["candidates"] if "kl" in c]
    assert len(cands) >= 2 and rep["tokens"] == 4 * 31
    best = min(cands, key=lambda c: c["kl"])
    assert rep["chosen_kv_fraction"] == best["kv_fraction"]
    assert sum(s.n_kv for s in lay.layers) - sum(plan.kept_kv) == best["kv_groups_removed"]
    # the recorded KL is the real one: recompute it with the sliced model
    with torch.no_grad():
        p = torch.log_softmax(m(input_ids=CALIB[:4]).logits[:, :-1].float(), -1)
        q = torch.log_softmax(pruned(input_ids=CALIB[:4]).logits[:, :-1].float(), -1)
    assert abs(float((p.exp() * (p - q)).sum(-1).mean()) - best["kl"]) < 1e-5
    assert count_params(pruned) == plan.provenance["params_after"]
