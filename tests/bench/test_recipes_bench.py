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


def test_candidate_tags_are_checked(bench):
    assert bench.parse_row("balanced:0.2:1:search40") == ("balanced", 0.2, 1, "search40")
    with pytest.raises(SystemExit, match="unknown candidate"):
        bench.parse_row("balanced:0.2:1:nosuch")
