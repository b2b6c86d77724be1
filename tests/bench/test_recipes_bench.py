"""benchmarks/recipes_smollm2.py's bookkeeping: rows count as the recipe whose settings actually ran."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from gqaprune.prune.recipes import RECIPES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))   # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("recipes_bench", REPO / "benchmarks" / "recipes_smollm2.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _ppl(x):   # both halves at both windows with PPL x
    return {k: {"ppl": x, "nll": math.log(x), "n_tokens": 1000} for k in ("A128", "B128", "A2048", "B2048")}


def _row(settings, seed, candidate=None):
    return {"recipe": "balanced", "ratio": 0.2, "seed": seed, "prune_s": 10.0, "candidate": candidate,
            "recipe_record": {"settings": settings}, "reduction": 0.2}


def test_summary_groups_by_the_settings_that_ran(bench):
    earlier = {**RECIPES["balanced"], "allocation": "sensitivity"}
    data = {"meta": {"model": "m", "machine": {"cores_visible": 2}},
            "rows": {"old s0": _row(earlier, 0), "cand s0": _row(dict(RECIPES["balanced"]), 0, candidate="search40"),
                     "new s0 again": _row(dict(RECIPES["balanced"]), 0), "new s1": _row(dict(RECIPES["balanced"]), 1)},
            "ppl": {"dense": _ppl(10.0), "old s0": _ppl(40.0), "cand s0": _ppl(20.0), "new s0 again": _ppl(20.0),
                    "new s1": _ppl(30.0)}}
    assert bench.current_recipe(data["rows"]["old s0"]["recipe_record"]) is None
    assert bench.current_recipe(data["rows"]["cand s0"]["recipe_record"]) == "balanced"
    assert bench.label(data["rows"]["old s0"]).endswith("(the recipe's earlier settings)")
    assert bench.label(data["rows"]["cand s0"]).endswith("(= today's balanced)")
    assert bench.label(data["rows"]["new s1"]) == "balanced"
    (s,) = bench.summary(data)
    # the earlier settings are left out, and seed 0 (pruned twice with today's settings) counts once
    assert s["recipe"] == "balanced" and s["seeds"] == 2 and s["x_dense_w128_seeds"] == [2.0, 3.0]
    assert s["x_dense_w128"] == pytest.approx(2.5)


def test_rows_of_earlier_code_count_only_where_no_row_of_todays_code_does(bench):
    bal = dict(RECIPES["balanced"])
    old = lambda seed, ratio=0.2: {**_row(bal, seed), "ratio": ratio, "superseded": "before the change"}  # noqa: E731
    data = {"meta": {"model": "m", "machine": {"cores_visible": 2}},
            "rows": {"old 20 s0": old(0), "old 20 s1": old(1), "new 20 s0": _row(bal, 0), "old 50 s0": old(0, 0.5)},
            "ppl": {"dense": _ppl(10.0), "old 20 s0": _ppl(40.0), "old 20 s1": _ppl(50.0), "new 20 s0": _ppl(20.0),
                    "old 50 s0": _ppl(90.0)}}
    s20, s50 = sorted(bench.summary(data), key=lambda x: x["ratio"])
    # at 20% today's code measured seed 0: the earlier rows (seed 0 and seed 1) drop out
    assert s20["seeds"] == 1 and s20["x_dense_w128_seeds"] == [2.0] and "pruned before" not in s20["protocol"]
    # at 50% only earlier code measured it: the row counts, and the protocol says so
    assert s50["seeds"] == 1 and s50["x_dense_w128"] == pytest.approx(9.0)
    assert s50["protocol"].endswith("; pruned before the change")
    assert "(pruned before the change)" in bench.label(data["rows"]["old 50 s0"])


def test_candidate_tags_are_checked(bench):
    assert bench.parse_row("balanced:0.2:1:search40") == ("balanced", 0.2, 1, "search40")
    with pytest.raises(SystemExit, match="unknown candidate"):
        bench.parse_row("balanced:0.2:1:nosuch")


def _results(rows, ppl, date):
    return {"meta": {"date": date, "command": f"run {date}", "also_running": "x", "machine": {"git": "abc"}},
            "tokens": {"test": 303415, "half": 151552, "val": 32768}, "rows": rows, "ppl": ppl, "notes": [date]}


def test_merge_folds_a_side_run_in_and_refuses_conflicts(bench):
    main = _results({"a s0": _row(dict(RECIPES["balanced"]), 0)}, {"dense": _ppl(10.0), "a s0": _ppl(20.0)}, "d1")
    side = _results({"b s1": _row(dict(RECIPES["balanced"]), 1)}, {"b s1": _ppl(30.0), "dense": {"val": {"ppl": 5}}},
                    "d2")
    bench.merge(main, side, "side.json")
    assert set(main["rows"]) == {"a s0", "b s1"} and main["ppl"]["b s1"] == _ppl(30.0)
    assert main["ppl"]["dense"]["val"] == {"ppl": 5} and main["ppl"]["dense"]["A128"]["ppl"] == 10.0
    assert [e["date"] for e in main["earlier_runs"]] == ["d2"] and main["notes"] == ["d1", "d2"]
    bench.merge(main, side, "side.json")          # folding the same file again changes nothing
    assert len(main["earlier_runs"]) == 1
    copy = _results({}, {}, "d5")                 # a side file started from a copy of main lists main's own run
    copy["earlier_runs"] = [{**{k: main["meta"][k] for k in ("date", "command", "also_running")}, "git": "abc"}]
    bench.merge(main, copy, "copy.json")
    assert [e["date"] for e in main["earlier_runs"]] == ["d2", "d5"]
    clash = _results({}, {"a s0": _ppl(21.0)}, "d3")
    with pytest.raises(SystemExit, match="a s0 A128 is measured in both"):
        bench.merge(main, clash, "clash.json")
    other_text = _results({}, {}, "d4")
    other_text["tokens"]["val"] = 1000
    with pytest.raises(SystemExit, match="val token count"):
        bench.merge(main, other_text, "other.json")
