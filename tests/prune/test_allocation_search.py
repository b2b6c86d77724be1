"""--allocation search: local search over per-layer counts on calibration KL (tiny models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import make_tiny_model
from gqaprune.errors import GQAPruneError
from gqaprune.prune.allocate.search import _Evaluator, _State, search_allocation
from gqaprune.prune.score import score_units
from gqaprune.prune.budget import Budget
from gqaprune.prune.plan import PrunePlan, make_plan
from gqaprune.prune.command import PruneOptions, notes_for, prune_model
from gqaprune.models.layout import count_params, model_layout
from gqaprune.prune.surgery import apply_plan

CALIB = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(5))


def _kl_of(dense, pruned, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(pruned(input_ids=ids).logits[:, :-1].float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def TARGET(lay):
    """The budget of _setup's plans, resolved for ``lay``."""
    return Budget(ratio=0.3).resolve(lay)


def _setup(**cfg):
    """A tiny model (eval mode), its layout, magnitude scores and a 30% per-layer plan."""
    m = make_tiny_model(**cfg).eval()
    lay = model_layout(m)
    scores = score_units(m, lay, "magnitude", None)
    return m, lay, scores, make_plan(lay, scores, Budget(ratio=0.3).resolve(lay), layout_kind="per-layer")


def test_cached_partial_reruns_give_the_full_forward_kl():
    m, lay, scores, plan = _setup(num_hidden_layers=4, num_key_value_heads=4, num_attention_heads=8)
    state = _State(lay, scores, [s.n_kv - k for s, k in zip(lay.layers, plan.kept_kv)],
                   [s.n_mlp - k for s, k in zip(lay.layers, plan.kept_mlp)])
    ev = _Evaluator(m, lay, CALIB[:4], batch_size=2)
    kl0 = ev.reset(state)
    assert abs(kl0 - _kl_of(m, apply_plan(copy.deepcopy(m), plan), CALIB[:4])) < 1e-5
    # a move between layers 2 and 3 rerun from layer 2 equals the full rerun of the moved state
    moved = state.copy()
    moved.mlp_rm[2] += 8
    moved.mlp_rm[3] -= 8
    part, _ = ev.run(moved, 2)
    full, _ = ev.run(moved, 0)
    assert abs(part - full) < 1e-6 and abs(part - kl0) > 1e-7


def test_search_lowers_calibration_kl_and_keeps_the_parameter_count():
    m, lay, scores, plan = _setup(num_hidden_layers=4)
    new, rep = search_allocation(m, lay, scores, plan, CALIB[:4], TARGET(lay), evaluations=40, samples=4,
                                 batch_size=4, moves="same", progress=False)
    assert rep["evaluations"] == 40 and rep["check_samples"] == 0
    assert rep["kl_end"] < rep["kl_start"] and rep["accepted"]
    assert all(a["kl"] < b for a, b in zip(rep["accepted"], [rep["kl_start"]] + [x["kl"] for x in rep["accepted"]]))
    assert new.provenance["params_after"] == plan.provenance["params_after"]
    assert (new.kept_mlp, new.kept_kv) != (plan.kept_mlp, plan.kept_kv)
    # the recorded KL is the sliced model's
    assert abs(_kl_of(m, apply_plan(copy.deepcopy(m), new), CALIB[:4]) - rep["kl_end"]) < 1e-5
    # within each layer the scores still choose
    for i, keep in enumerate(new.mlp_channels):
        top = sorted(torch.argsort(scores[i]["mlp"], descending=True, stable=True)[:len(keep)].tolist())
        assert keep == top


def test_search_result_is_rejected_when_the_check_samples_disagree(monkeypatch):
    import gqaprune.prune.allocate.search as A

    m, lay, scores, plan = _setup(num_hidden_layers=3)
    real = A._Evaluator.run
    calls = {"n": 0}

    def run(self, state, start=0, keep=False):
        kl, kept = real(self, state, start, keep)
        if not keep:   # only the check samples are scored without keeping states: make their KL rise each time
            calls["n"] += 1
            kl += calls["n"]
        return kl, kept

    monkeypatch.setattr(A._Evaluator, "run", run)
    new, rep = search_allocation(m, lay, scores, plan, CALIB, TARGET(lay), evaluations=20, samples=4, batch_size=4,
                                 progress=False)
    assert rep["check_samples"] == 4 and rep["check_kl_end"] > rep["check_kl_start"]
    assert rep["used"] is False and new is plan


def test_prune_with_allocation_search_records_provenance_and_replays():
    m = make_tiny_model(num_hidden_layers=4)
    o = PruneOptions(recipe="fast", pruning_ratio=0.3, criterion="taylor", layout="per-layer", allocation="search",
                     sensitivity_samples=4, search_samples=4, search_evaluations=25, calib_batch_size=4,
                     compensate=True)
    pruned, plan = prune_model(copy.deepcopy(m), o, CALIB, progress=False)
    prov = plan.provenance
    assert prov["allocation"] == "search" and prov["sensitivity"]["samples"] == 4
    rep = prov["allocation_search"][0]
    assert rep["evaluations"] == 25 and rep["kl_end"] <= rep["kl_start"] and rep["check_samples"] == 4
    assert count_params(pruned) == prov["params_after"]
    again = PrunePlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert any(n.startswith("allocation search: KL per token") and "mixed" not in n for n in notes_for(plan))


def test_allocation_search_needs_per_layer_layout(tiny_model):
    with pytest.raises(GQAPruneError, match="per-layer"):
        prune_model(tiny_model, PruneOptions(recipe="fast", pruning_ratio=0.3, allocation="search"), CALIB, progress=False)


def test_mixed_moves_trade_kv_groups_for_channels_and_stay_within_half_a_channel():
    """Random mixed moves applied blindly: the removed parameter count never drifts more than half an
    MLP channel from where it started, both trade directions occur, and they are what they say."""
    import random

    from gqaprune.prune.allocate.search import _apply, _moves, _removed_params

    m, lay, scores, plan = _setup(num_hidden_layers=4)  # 2 KV groups of 4 query heads: 5120 / 192 parameters
    A, M = lay.group_params, lay.channel_params
    assert A % M  # the rounding is exercised
    state = _State(lay, scores, [s.n_kv - k for s, k in zip(lay.layers, plan.kept_kv)],
                   [s.n_mlp - k for s, k in zip(lay.layers, plan.kept_mlp)])
    target, rng, seen = _removed_params(state), random.Random(0), set()
    pruned = list(range(lay.num_layers))
    for _ in range(300):
        mv = _moves(state, pruned, 8, 1, rng, mixed=True, target=target)
        kind, a, b, n = mv
        new = _apply(state, mv)
        if kind == "kv>mlp":
            assert new.kv_rm[a] == state.kv_rm[a] + 1 and n == round((_removed_params(state) + A - target) / M)
        if kind == "mlp>kv":
            assert new.kv_rm[a] == state.kv_rm[a] - 1
        assert abs(_removed_params(new) - target) <= M / 2, (kind, _removed_params(new) - target)
        assert all(0 <= r < s.n_kv for r, s in zip(new.kv_rm, lay.layers))  # at least one group stays
        assert all(0 <= r < s.n_mlp for r, s in zip(new.mlp_rm, lay.layers))
        seen.add(kind)
        state = new
    assert {"kv>mlp", "mlp>kv", "mlp", "kv"} <= seen
    # same-kind moves only: never a trade
    rng = random.Random(0)
    assert all(_moves(state, pruned, 8, 1, rng)[0] in ("mlp", "kv") for _ in range(50))


def test_mixed_search_lowers_kl_and_reports_trades():
    m, lay, scores, plan = _setup(num_hidden_layers=4, num_key_value_heads=4, num_attention_heads=8)
    new, rep = search_allocation(m, lay, scores, plan, CALIB[:4], TARGET(lay), evaluations=60, samples=4, batch_size=4,
                                 moves="mixed", progress=False)
    assert rep["moves"] == "mixed" and rep["kl_end"] < rep["kl_start"]
    assert abs(new.provenance["params_after"] - plan.provenance["params_after"]) <= lay.channel_params / 2
    assert abs(_kl_of(m, apply_plan(copy.deepcopy(m), new), CALIB[:4]) - rep["kl_end"]) < 1e-5
    from gqaprune.prune.allocate.search import summary_line

    assert "mixed moves" in summary_line(rep) and "KV groups traded" in summary_line(rep)
    with pytest.raises(GQAPruneError, match="search-moves"):
        search_allocation(m, lay, scores, plan, CALIB[:4], TARGET(lay), evaluations=1, samples=4, moves="any", progress=False)


def test_screened_search_reports_the_true_kl_and_turns_moves_down_early():
    """--search-screen-samples: a move is scored on the first samples first; the KL of every move that passes
    is the full one (the sliced model's), and moves turned down on the screen never cost a full evaluation."""
    m, lay, scores, plan = _setup(num_hidden_layers=4)
    new, rep = search_allocation(m, lay, scores, plan, CALIB[:4], TARGET(lay), evaluations=40, samples=4,
                                 batch_size=1, moves="same", screen=1, progress=False)
    assert rep["screen_samples"] == 1 and 0 < rep["screened_out"] < 40 and rep["evaluations"] == 40
    assert rep["kl_end"] < rep["kl_start"] and rep["tokens"] == 4 * 31
    assert abs(_kl_of(m, apply_plan(copy.deepcopy(m), new), CALIB[:4]) - rep["kl_end"]) < 1e-5
    assert new.provenance["params_after"] == plan.provenance["params_after"]
    assert "turned down on the first 1 samples" in notes_for(new.__class__.from_dict(
        {**json.loads(new.to_json()), "provenance": {**new.provenance, "allocation_search": [rep | {"step": 1}]}}))[-1]
