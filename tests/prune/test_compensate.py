"""Error compensation (--compensate) and iterative pruning (--steps) on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import make_tiny_model
from gqaprune.prune.score import score_units
from gqaprune.prune.compensate import LstsqStats, compensate
from gqaprune.prune.layerwise import capture_layer_inputs
from gqaprune.prune.budget import Budget
from gqaprune.prune.plan import PrunePlan, make_plan
from gqaprune.prune.command import PruneOptions, prune_model
from gqaprune.models.layout import model_layout
from gqaprune.prune.surgery import apply_plan

CALIB = torch.randint(3, 320, (24, 32), generator=torch.Generator().manual_seed(2))
TEST = torch.randint(3, 320, (6, 32), generator=torch.Generator().manual_seed(7))   # never fitted


def logits(model, x=TEST):
    with torch.no_grad():
        return model(input_ids=x).logits


def rel(a, b):
    return float((a - b).norm() / b.norm())


def plan_for(model, ratio=0.3, layout_kind="uniform"):
    lay = model_layout(model)
    return make_plan(lay, score_units(model, lay, "magnitude", None), Budget(ratio=ratio).resolve(lay), layout_kind=layout_kind)


def layer_outputs(model, ids=TEST):
    """Hidden states leaving every decoder layer."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[1:]


def test_lstsq_stats_match_direct_solution():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(500, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = x @ w.T + 0.1 * torch.randn(500, 5, generator=g, dtype=torch.float64)
    st = LstsqStats(12, 5, "cpu", torch.float64)
    for part in (slice(0, 123), slice(123, 500)):   # streamed in two batches
        st.add(x[part], y[part])
    sol, lam = st.solve(0.0)
    ref = torch.linalg.lstsq(x, y).solution.T
    assert torch.allclose(sol, ref, atol=1e-8)
    assert abs(st.rel_error(sol) - float((y - x @ sol.T).norm() / y.norm())) < 1e-10
    assert abs(st.rel_error(w) - float((y - x @ w.T).norm() / y.norm())) < 1e-10


@pytest.mark.parametrize("target", ["layer", "dense"])
def test_compensation_lowers_layer_and_logit_error(tiny_model, target):
    plan = plan_for(tiny_model, 0.3)
    ref_logits, ref_layers = logits(tiny_model), layer_outputs(tiny_model)
    plain = apply_plan(copy.deepcopy(tiny_model), plan)
    comp_src = copy.deepcopy(tiny_model)
    rep = compensate(comp_src, plan, CALIB, target=target, progress=False)
    comp = apply_plan(comp_src, plan)
    # reconstruction error reported per layer, and lower after the refit (fitted tokens)
    refit = [x[k] for x in rep["layers"] for k in ("attn", "mlp") if k in x]
    assert len(refit) == 4
    assert all(r["err_after"] <= r["err_before"] for r in refit)
    assert any(r["refit"] and r["err_after"] < 0.95 * r["err_before"] for r in refit)
    assert rep["tokens_fit"] + rep["tokens_heldout"] == CALIB.numel() and rep["tokens_heldout"] == 3 * 32
    json.dumps(rep)  # goes into the plan's provenance
    # on tokens never seen by the fit: the final layer's output and the logits are closer to the dense model's
    assert rel(layer_outputs(comp)[-1], ref_layers[-1]) < rel(layer_outputs(plain)[-1], ref_layers[-1])
    assert rel(logits(comp), ref_logits) < rel(logits(plain), ref_logits)


def test_layer_target_first_layer_error_matches_report(tiny_model):
    """The reported held-out error of layer 0's down_proj is the real one (recomputed by hand)."""
    plan = plan_for(tiny_model, 0.3)
    m = copy.deepcopy(tiny_model)
    rep = compensate(m, plan, CALIB, target="layer", holdout=0.25, progress=False)
    held = CALIB[-6:]
    (h, kws), = capture_layer_inputs(tiny_model, held, batch_size=8)
    kw = kws[0]
    dense, pr = tiny_model.model.layers[0], m.model.layers[0]
    with torch.no_grad():
        r = h + pr.self_attn(hidden_states=pr.input_layernorm(h), **kw)[0]   # pruned model's own residual
        x = pr.post_attention_layernorm(r)
        y = dense.mlp(x)
        y_hat = pr.mlp(x)
    want = rep["layers"][0]["mlp"]["heldout_after" if rep["layers"][0]["mlp"]["refit"] else "heldout_before"]
    assert abs(rel(y_hat, y) - want) < 1e-5


def test_nothing_removed_leaves_weights_unchanged(tiny_model):
    lay = model_layout(tiny_model)
    keep_all = PrunePlan("uniform", [list(range(s.n_kv)) for s in lay.layers], [list(range(s.n_mlp)) for s in lay.layers],
                         plan_for(tiny_model).source_shape)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for target in ("layer", "dense"):
        rep = compensate(tiny_model, keep_all, CALIB, target=target, progress=False)
        assert all(set(x) == {"layer"} for x in rep["layers"])
        after = tiny_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # a layer that loses nothing is untouched even when others are refit
    plan = copy.deepcopy(keep_all)
    plan.kv_groups[1] = [0]
    plan.mlp_channels[1] = list(range(0, 128, 2))
    compensate(tiny_model, plan, CALIB, progress=False)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.layers.0."))
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])


def test_ridge_pulls_towards_current_weights(tiny_model):
    """A huge ridge means 'no refit' (kept columns as they were), not 'shrink to zero'."""
    plan = plan_for(tiny_model, 0.3)
    m = copy.deepcopy(tiny_model)
    rep = compensate(m, plan, CALIB, ridge=1e9, holdout=0, progress=False)
    assert all(x[k]["refit"] for x in rep["layers"] for k in ("attn", "mlp"))
    plain = apply_plan(copy.deepcopy(tiny_model), plan)
    refit = apply_plan(m, plan)
    for a, b in zip(plain.model.layers, refit.model.layers):
        assert torch.allclose(a.mlp.down_proj.weight, b.mlp.down_proj.weight, atol=1e-6)
        assert torch.allclose(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight, atol=1e-6)
    # and the automatic ridge is picked from the grid and recorded
    rep = compensate(copy.deepcopy(tiny_model), plan, CALIB, progress=False)
    from gqaprune.prune.compensate import RIDGE_GRID
    assert all(x[k]["ridge"] in RIDGE_GRID for x in rep["layers"] for k in ("attn", "mlp"))


def test_overfit_refit_is_rejected_on_heldout():
    """Two calibration samples, a wide MLP: the fit memorises; held-out data must veto it."""
    m = make_tiny_model(intermediate_size=256)
    plan = plan_for(m, 0.4)
    rep = compensate(m, plan, CALIB[:2, :16], holdout=0.5, ridge=1e-6, progress=False)
    mlp = [x["mlp"] for x in rep["layers"]]
    assert all(r["err_after"] < 0.05 for r in mlp)            # fitted tokens: near-perfect
    assert all(not r["refit"] and "held-out" in r["why_not"] for r in mlp)


def test_bad_compensation_inputs(tiny_model):
    from gqaprune.errors import GQAPruneError

    plan = plan_for(tiny_model)
    with pytest.raises(GQAPruneError, match="target"):
        compensate(tiny_model, plan, CALIB, target="nope")
    with pytest.raises(GQAPruneError, match="holdout"):
        compensate(tiny_model, plan, CALIB, holdout=1.0)


def opts(**kw):
    base = dict(recipe="fast", pruning_ratio=0.4, criterion="taylor", calib_batch_size=8)
    base.update(kw)
    return PruneOptions(**base)


@pytest.mark.parametrize("layout_kind", ["uniform", "per-layer"])
def test_iterative_plan_replays_on_original(tiny_model, layout_kind):
    src = copy.deepcopy(tiny_model)
    pruned, plan = prune_model(copy.deepcopy(tiny_model), opts(steps=3, layout=layout_kind), CALIB, progress=False)
    steps = plan.provenance["step_log"]
    assert len(steps) == 3 and plan.provenance["steps"] == 3
    done = [s for s in steps if "params_after" in s]
    assert len(done) >= 2 and all(a["params_after"] > b["params_after"] for a, b in zip(done, done[1:]))
    # indices refer to the original model: JSON round trip, replay, same structure and the same logits
    again = PrunePlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    again.check_matches(model_layout(src))
    replay = apply_plan(src, again)
    assert torch.equal(logits(replay), logits(pruned))
    assert model_layout(replay).total_params == plan.provenance["params_after"]
    # the budget is met as closely as the one-shot plan meets it
    one = make_plan(model_layout(tiny_model), score_units(tiny_model, model_layout(tiny_model), "taylor", CALIB,
                    progress=False), Budget(ratio=0.4).resolve(model_layout(tiny_model)),
                    layout_kind=layout_kind)
    lay = model_layout(tiny_model)
    assert abs(plan.provenance["params_after"] - one.provenance["params_after"]) <= \
        lay.num_layers * (lay.group_params + lay.channel_params)


def test_iterative_rescoring_changes_choice():
    """Re-scoring between steps must actually re-score: with random scores a new draw per step."""
    m = make_tiny_model()
    _, p1 = prune_model(copy.deepcopy(m), opts(criterion="random", steps=1, pruning_ratio=0.5), None,
                        progress=False)
    _, p3 = prune_model(copy.deepcopy(m), opts(criterion="random", steps=3, pruning_ratio=0.5), None,
                        progress=False)
    assert p1.mlp_channels != p3.mlp_channels


def test_steps_with_compensation_records_every_step(tiny_model):
    pruned, plan = prune_model(copy.deepcopy(tiny_model), opts(steps=2, compensate=True), CALIB, progress=False)
    comp = plan.provenance["compensation"]
    assert [c["step"] for c in comp] == [1, 2]
    assert all("err_after" in x.get("mlp", {"err_after": 0}) for c in comp for x in c["layers"])
    again = apply_plan(copy.deepcopy(tiny_model), PrunePlan.from_dict(json.loads(plan.to_json())))
    assert model_layout(again) == model_layout(pruned)    # structure replays; weights were refit


def test_cli_prune_compensate_and_replay(tiny_dir, tmp_path, capsys):
    from gqaprune.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(400)))
    out = tmp_path / "comp"
    args = ["prune", "--model", str(tiny_dir), "--output", str(out), "--calibration", str(calib), "--num-samples", "8",
            "--seq-len", "16", "--pruning-ratio", "0.3", "--compensate", "--steps", "2", "--recipe", "fast"]
    assert main(args) == 0
    prov = json.loads((out / "prune_plan.json").read_text())["provenance"]
    assert prov["steps"] == 2 and len(prov["compensation"]) == 2
    assert prov["compensation"][0]["tokens_fit"] == 7 * 16 and prov["compensation"][0]["tokens_heldout"] == 16
    summary = json.loads((out / "prune_summary.json").read_text())
    assert any(n.startswith("step 1: compensation") for n in summary["notes"])
    # replay the plan with a one-shot refit from the dense model
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(out / "prune_plan.json"), "--output",
                 str(tmp_path / "re"), "--compensate", "--calibration", str(calib), "--num-samples", "8",
                 "--seq-len", "16"]) == 0
    prov2 = json.loads((tmp_path / "re" / "prune_plan.json").read_text())["provenance"]
    assert len(prov2["compensation"]) == 1 and prov2["applied_from"]
    capsys.readouterr()
    assert main(args[:-2] + ["--steps", "0", "--output", str(tmp_path / "x")]) == 2
    assert "--steps" in capsys.readouterr().err


def test_greedy_obs_first_cost_is_the_best_single_removal():
    """Step 1 of greedy OBS removes the unit whose removal + optimal refit costs least, and its cost is that error."""
    from gqaprune.prune.score.obs import OBS_DAMP, greedy_obs_order

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    gram = x.T @ x
    lam = OBS_DAMP * float(gram.diagonal().mean())
    for group in (1, 3):
        costs = []
        for u in range(12 // group):
            keep = [c for c in range(12) if not u * group <= c < (u + 1) * group]
            # refit the kept columns to reproduce Y = X W^T under the same damping (ridge towards zero)
            gk = gram[keep][:, keep] + lam * torch.eye(len(keep), dtype=torch.float64)
            rhs = (gram + lam * torch.eye(12, dtype=torch.float64))[keep] @ w.T
            wk = torch.linalg.solve(gk, rhs).T
            # damped error: ||X W^T - X_k Wk^T||^2 + lam ||W - Wk (padded)||^2
            full = torch.zeros_like(w)
            full[:, keep] = wk
            d = w - full
            costs.append(float((d @ (gram + lam * torch.eye(12, dtype=torch.float64)) * d).sum()))
        score = greedy_obs_order(w, gram, group)
        first = int(torch.argmin(score))
        assert first == min(range(len(costs)), key=costs.__getitem__)
        assert abs(float(score[first]) - min(costs)) < 1e-6 * max(1.0, min(costs))
        assert float(score.max()) > float(score[score < score.max()].max())   # the survivor scores highest


def test_obs_criterion_prunes_and_compensates(tiny_model):
    pruned, plan = prune_model(copy.deepcopy(tiny_model), opts(criterion="obs", compensate=True, layout="per-layer"),
                               CALIB, progress=False)
    assert model_layout(pruned).total_params == plan.provenance["params_after"]
    # obs + refit reconstructs the last layer's output better than magnitude + refit on unseen tokens
    mag, _ = prune_model(copy.deepcopy(tiny_model), opts(criterion="magnitude", compensate=True, layout="per-layer"),
                         CALIB, progress=False)
    ref = layer_outputs(tiny_model)[-1]
    assert rel(layer_outputs(pruned)[-1], ref) < rel(layer_outputs(mag)[-1], ref)
