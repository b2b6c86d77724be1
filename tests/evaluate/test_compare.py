"""Side-by-side comparison: recovery %, the guide's tiers, and their scaling (hand-made numbers)."""

import json

import pytest

from gqaprune.errors import GQAPruneError
from gqaprune.evaluate.compare import REFERENCE_PPL, ModelScores, compare, recovery_pct, tier_limits

TASKS = {"piqa": 0.80, "boolq": 0.70, "arc_easy": 0.60}


def scores(label, ppl, acc=None):
    return ModelScores(label, {"wikitext2": ppl}, dict(acc or {}))


def scaled_acc(ratio):
    return {t: v * ratio for t, v in TASKS.items()}


def tier_passed(c, name):
    return next(t for t in c.tiers if t.tier == name).passed


# ---------------------------------------------------------------- recovery %

def test_recovery_pct_ppl_and_acc():
    # PPL 20 -> 40 pruned -> 25 recovered: won back 15 of 20 lost.
    assert recovery_pct(20.0, 40.0, 25.0, higher_is_better=False) == pytest.approx(75.0)
    # acc 0.8 -> 0.6 -> 0.75: won back 0.15 of 0.2.
    assert recovery_pct(0.8, 0.6, 0.75, higher_is_better=True) == pytest.approx(75.0)
    # back to the original exactly, better than it, and worse than pruned
    assert recovery_pct(20.0, 40.0, 20.0, higher_is_better=False) == pytest.approx(100.0)
    assert recovery_pct(20.0, 40.0, 18.0, higher_is_better=False) == pytest.approx(110.0)
    assert recovery_pct(0.8, 0.6, 0.5, higher_is_better=True) == pytest.approx(-50.0)


def test_recovery_pct_nothing_lost_is_none_not_a_division_by_zero():
    assert recovery_pct(20.0, 20.0, 19.0, higher_is_better=False) is None
    assert recovery_pct(0.7, 0.7, 0.71, higher_is_better=True) is None
    # pruning "helped": nothing to recover either
    assert recovery_pct(20.0, 19.0, 18.0, higher_is_better=False) is None
    assert recovery_pct(0.7, 0.75, 0.8, higher_is_better=True) is None
    assert recovery_pct(0.7, None, 0.8, higher_is_better=True) is None


def test_compare_pruned_equal_to_original_gives_na_and_no_crash():
    o = scores("dense", 19.66, TASKS)
    c = compare(o, scores("pruned", 19.66, TASKS), scores("rec", 19.66, TASKS))
    assert all(r.recovery_pct is None for r in c.rows)
    md = c.markdown()
    assert "n/a" in md
    # no 20% gain over an unharmed pruned model: minimum fails, and says why
    assert c.verdict == "below minimum"
    assert any("20%" in reason and reason.startswith("FAIL") for reason in c.tiers[0].reasons)
    json.dumps(c.to_dict())


# ---------------------------------------------------------------- tiers at the guide's reference

def test_perfect_tier():
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 60.0, scaled_acc(0.6)),
                scores("r", 21.0, scaled_acc(0.97)))
    assert c.verdict == "perfect"
    assert [t.passed for t in c.tiers] == [True, True, True]
    assert not c.scaled and c.scale_factor == pytest.approx(1.0)
    assert "unscaled" in c.markdown()


def test_ideal_tier_ppl_between_22_and_25():
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 60.0, scaled_acc(0.6)),
                scores("r", 24.0, scaled_acc(0.97)))
    assert c.verdict == "ideal"
    assert tier_passed(c, "ideal") and not tier_passed(c, "perfect")
    assert any("above 22" in r for r in c.tiers[2].reasons)


def test_minimum_tier_ppl_and_tasks():
    # PPL 28 < 30 and 53% better than the pruned 60; every task at 90% (> 85%, not > 95%)
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 60.0, scaled_acc(0.6)),
                scores("r", 28.0, scaled_acc(0.90)))
    assert c.verdict == "minimum"
    ideal = c.tiers[1]
    assert not ideal.passed
    assert any(r.startswith("FAIL: PPL 28.00 >= 25") for r in ideal.reasons)
    assert any("not above 95%" in r for r in ideal.reasons)


def test_good_ppl_but_one_task_below_85_percent_fails_minimum():
    acc = scaled_acc(0.99)
    acc["boolq"] = TASKS["boolq"] * 0.84  # one task only: the rule is per task, not the mean
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 60.0, scaled_acc(0.6)), scores("r", 21.0, acc))
    assert c.verdict == "below minimum"
    assert any("boolq 84.0%" in r for r in c.tiers[0].reasons)
    mean_row = next(r for r in c.rows if r.metric == "mean acc")
    assert mean_row.vs_original > 0.85  # the mean alone would have passed


def test_minimum_needs_20_percent_gain_over_pruned():
    # 29 < 30, but only 3.3% better than the pruned 30.0
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 30.0, scaled_acc(0.9)),
                scores("r", 29.0, scaled_acc(0.99)))
    assert c.verdict == "below minimum"
    assert any(r.startswith("FAIL: PPL 3.3% lower") for r in c.tiers[0].reasons)
    # exactly 20% lower passes that criterion
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 30.0, scaled_acc(0.9)),
                scores("r", 24.0, scaled_acc(0.99)))
    assert tier_passed(c, "minimum") and c.verdict == "ideal"


def test_ppl_30_is_not_below_30():
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 80.0, scaled_acc(0.6)),
                scores("r", 30.0, scaled_acc(0.99)))
    assert c.verdict == "below minimum"


def test_ppl_below_perfect_range_is_flagged():
    c = compare(scores("o", REFERENCE_PPL, TASKS), scores("p", 60.0, scaled_acc(0.6)),
                scores("r", 18.0, scaled_acc(1.0)))
    assert c.verdict == "ideal"
    assert any("below 19" in r and "evaluation text" in r for r in c.tiers[2].reasons)


# ---------------------------------------------------------------- scaling

def test_tier_limits_scale_with_original_ppl():
    lim = tier_limits(10.0)
    f = 10.0 / 19.66
    assert lim["factor"] == pytest.approx(f)
    assert lim["minimum_ppl"] == pytest.approx(30 * f) == pytest.approx(10.0 * 1.526, rel=1e-3)
    assert lim["ideal_ppl"] == pytest.approx(25 * f) == pytest.approx(10.0 * 1.272, rel=1e-3)
    assert lim["perfect_ppl"] == pytest.approx((19 * f, 22 * f))
    with pytest.raises(GQAPruneError):
        tier_limits(0.0)
    with pytest.raises(GQAPruneError):
        tier_limits(float("nan"))


def test_scaled_tiers_for_another_model():
    # A small model at PPL 40 (factor 2.035): 55 < 61.0 (minimum) but > 50.9 (ideal).
    o = scores("smollm2", 40.0, TASKS)
    c = compare(o, scores("p", 200.0, scaled_acc(0.6)), scores("r", 55.0, scaled_acc(0.99)))
    assert c.scaled and c.scale_factor == pytest.approx(40.0 / 19.66)
    assert c.verdict == "minimum"
    md = c.markdown()
    assert "scaled by 2.035" in md and "61.04" in md
    # unscaled, 55 would fail every tier: the scaling is what makes it pass
    c_unscaled = compare(scores("o", 19.66, TASKS), scores("p", 200.0, scaled_acc(0.6)),
                         scores("r", 55.0, scaled_acc(0.99)))
    assert c_unscaled.verdict == "below minimum"
    d = c.to_dict()
    assert d["scaled"] is True and d["scale_factor"] == pytest.approx(2.0346, rel=1e-4)
    assert d["verdict"] == "minimum"
    json.dumps(d)


def test_scaled_perfect_range():
    o = scores("o", 40.0, TASKS)
    f = 40.0 / 19.66
    inside = compare(o, scores("p", 200.0, scaled_acc(0.6)), scores("r", 21.0 * f, scaled_acc(0.99)))
    assert inside.verdict == "perfect"
    above = compare(o, scores("p", 200.0, scaled_acc(0.6)), scores("r", 22.5 * f, scaled_acc(0.99)))
    assert above.verdict == "ideal"


# ---------------------------------------------------------------- tables, inputs

def test_markdown_and_json_contents():
    o = scores("dense", 19.66, TASKS)
    p = scores("pruned", 40.0, scaled_acc(0.6))
    r = scores("lora", 25.5, scaled_acc(0.9))
    c = compare(o, p, r)
    md = c.markdown()
    for text in ("original (dense)", "pruned (pruned)", "recovered (lora)", "recovery %", "wikitext2 PPL",
                 "piqa acc", "mean acc", "**Verdict: minimum**", "minimum: PASS", "ideal: FAIL", "perfect: FAIL"):
        assert text in md, text
    ppl_row = c.rows[0]
    assert ppl_row.recovery_pct == pytest.approx((40.0 - 25.5) / (40.0 - 19.66) * 100)
    assert f"{ppl_row.recovery_pct:.1f}%" in md
    d = json.loads(json.dumps(c.to_dict()))
    assert d["rows"][1]["metric"] == "piqa acc"
    assert d["rows"][1]["recovery_pct"] == pytest.approx(75.0)  # 0.48 -> 0.72 of 0.8: 0.24 / 0.32


def test_from_results_reads_ppl_and_zeroshot_dicts_and_checks_protocol():
    def ppl(value, seq_len=128):
        return {"dataset": "wikitext2", "split": "test", "seq_len": seq_len, "stride": seq_len,
                "n_tokens": 1000, "ppl": value, "nll": 0.0}

    zs = {"tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.62}, "boolq": {"acc": 0.55, "acc_norm": None}}}
    o = ModelScores.from_results("o", [ppl(19.66)], zs)
    assert o.ppl == {"wikitext2": 19.66} and o.acc == {"piqa": 0.6, "boolq": 0.55}
    assert "window 128" in o.protocol["wikitext2"]
    norm = ModelScores.from_results("o", [ppl(19.66)], zs, metric="acc_norm")
    assert norm.acc == {"piqa": 0.62, "boolq": 0.55}  # falls back to acc where a task has no acc_norm
    c = compare(o, ModelScores.from_results("p", [ppl(30.0)], zs), ModelScores.from_results("r", [ppl(22.0)], zs))
    assert "window 128" in c.ppl_protocol and "window 128" in c.markdown()
    with pytest.raises(GQAPruneError, match="different protocols"):
        compare(o, ModelScores.from_results("p", [ppl(30.0)], zs),
                ModelScores.from_results("r", [ppl(22.0, seq_len=2048)], zs))


def test_missing_ppl_is_a_clear_error():
    with pytest.raises(GQAPruneError, match="PPL"):
        compare(ModelScores("o", {}, TASKS), scores("p", 30.0), scores("r", 20.0))
