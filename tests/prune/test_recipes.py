"""--recipe: presets of the existing flags, explicit flags win, recorded in the plan; bad input exits 2."""

from __future__ import annotations

import json

import pytest

from gqaprune.cli import main
from gqaprune.errors import GQAPruneError
from gqaprune.prune.options import PruneOptions
from gqaprune.prune.recipes import BASE, DEFAULT, RECIPES, measured
from helpers import prune_args


def test_each_recipe_sets_its_flags_and_the_default_is_balanced():
    for name, settings in RECIPES.items():
        o = PruneOptions(pruning_ratio=0.2, recipe=name)
        assert {k: getattr(o, k) for k in settings} == settings
        assert o.recipe_record["name"] == name and not o.recipe_record["overridden"]
    o = PruneOptions(pruning_ratio=0.2)
    assert DEFAULT == "balanced" and o.recipe_record["name"] == "balanced"
    assert {k: getattr(o, k) for k in RECIPES["balanced"]} == RECIPES["balanced"]
    assert RECIPES["fast"] == BASE and RECIPES["best"]["allocation"] == RECIPES["balanced"]["allocation"] == "search"
    # balanced's search is the short one: fewer moves, each on fewer samples, than best's
    assert RECIPES["balanced"]["search_evaluations"] < RECIPES["best"]["search_evaluations"]
    assert RECIPES["balanced"]["search_samples"] < RECIPES["best"]["search_samples"]


def test_explicit_flags_win_and_are_recorded():
    o = PruneOptions(pruning_ratio=0.2, recipe="best", criterion="taylor", num_samples=32)
    assert o.criterion == "taylor" and o.num_samples == 32 and o.allocation == "search"
    assert o.recipe_record["overridden"] == {"criterion": {"recipe": "obs", "given": "taylor"},
                                             "num_samples": {"recipe": 128, "given": 32}}
    # a flag given with the recipe's own value is no override
    assert not PruneOptions(pruning_ratio=0.2, recipe="balanced", criterion="obs").recipe_record["overridden"]
    # an explicit uniform layout wins; the recipe's per-layer allocation cannot apply and is said to be dropped
    o = PruneOptions(pruning_ratio=0.2, recipe="balanced", layout="uniform")
    assert o.allocation == "scores" and "per-layer" in o.recipe_record["adjusted"][0]
    # ... but an allocation the user asked for is refused with that layout
    with pytest.raises(GQAPruneError, match="per-layer"):
        PruneOptions(pruning_ratio=0.2, recipe="balanced", layout="uniform", allocation="sensitivity")


def test_plan_replay_takes_no_recipe(tmp_path):
    with pytest.raises(GQAPruneError, match="--plan replays"):
        PruneOptions(plan=str(tmp_path / "p.json"), recipe="best")
    o = PruneOptions(plan=str(tmp_path / "p.json"))
    assert o.recipe_record["name"] is None and o.criterion == "taylor" and o.allocation == "scores"


def test_unknown_recipe_exits_2(capsys):
    with pytest.raises(SystemExit) as e:        # argparse's choices: exit 2 with the choices listed
        main(["prune", "--recipe", "fastest", "--pruning-ratio", "0.2", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--recipe" in err and "fastest" in err and "balanced" in err
    with pytest.raises(GQAPruneError, match="unknown; choose one of fast, balanced, best"):
        PruneOptions(pruning_ratio=0.2, recipe="fastest")


def test_the_plan_records_the_recipe_and_the_summary_reads_the_results_file(tiny_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "o"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.3", "--recipe", "balanced",
                           "--criterion", "taylor", "--sensitivity-samples", "2")) == 0
    rec = json.loads((out / "prune_plan.json").read_text())["provenance"]["recipe"]
    assert rec["name"] == "balanced" and rec["settings"]["layout"] == "per-layer" and rec["settings"]["compensate"]
    assert rec["overridden"]["criterion"] == {"recipe": "obs", "given": "taylor"}
    text = capsys.readouterr().out.replace("\n", " ")
    assert "recipe" in text and "--criterion taylor (given) over obs" in text


def test_measured_reads_the_nearest_row_and_is_silent_without_a_file(tmp_path):
    f = tmp_path / "r.json"
    row = {"recipe": "balanced", "model": "m", "ratio": 0.2, "x_dense_w128": 2.5, "x_dense_w2048": 2.6,
           "protocol": "p", "prune_s": 250.0, "machine": "2-core CPU"}
    f.write_text(json.dumps({"summary": [row, {**row, "ratio": 0.5, "x_dense_w128": 9.0}]}))
    assert "2.50x dense" in measured("balanced", 0.25, f) and "9.00x" in measured("balanced", 0.45, f)
    assert measured("best", 0.2, f) is None and measured("balanced", 0.2, tmp_path / "none.json") is None
    assert "prune 250 s on" in measured("balanced", 0.2, f)
    f.write_text(json.dumps({"summary": [{**row, "prune_s_range": [200.0, 300.0]}]}))
    assert "prune 200-300 s (alone or beside other jobs)" in measured("balanced", 0.2, f)


def test_held_out_alpaca_records_are_never_calibration_or_training(data_env, tmp_path):
    """The validation text for choosing recipes (alpaca-heldout) shares no record with what calibration and
    fine-tuning draw, for any seed."""
    from gqaprune.data.calibration import calibration_texts
    from gqaprune.data.corpora import load_text_corpus
    from gqaprune.data.instructions import HELD_OUT_EVERY, load_instruction_records, record_text

    train, held = load_instruction_records("alpaca"), load_instruction_records("alpaca", "held_out")
    assert len(held) == (len(train) + len(held)) // HELD_OUT_EVERY
    held_prompts = {record_text(r) for r in held}
    assert not held_prompts & {record_text(r) for r in train}
    for seed in (0, 1):
        texts, _ = calibration_texts("alpaca", seed, 200_000)
        assert texts and not set(texts) & held_prompts
    corpus = load_text_corpus("alpaca-heldout")
    assert corpus.dataset == "alpaca-heldout" and corpus.text == "\n\n".join(record_text(r) for r in held)
    from helpers import write_records

    other = write_records(tmp_path / "r.jsonl")
    assert len(load_instruction_records(str(other))) == 48       # other sources: no held-out part
    with pytest.raises(GQAPruneError, match="only Alpaca-cleaned"):
        load_instruction_records(str(other), "held_out")
