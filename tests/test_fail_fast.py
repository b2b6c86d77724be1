"""Fail fast, fail clearly (issue 11): every bad input named before the work, exit 2, no traceback.

One test per case of the issue's list (numbers in the test names), each able to fail on the code
that had the problem. "Before any work" is checked by making model loading fail the test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model, make_tokenizer, patch_load_model, prune_args, save_dense
from gqaprune.cli import main


def _bad(args, capsys, *match, rc=2):
    got = main(args)
    cap = capsys.readouterr()
    err = cap.err + cap.out
    assert got == rc, err
    assert "Traceback" not in err, err
    for m in match:
        assert m.lower() in err.lower(), err
    return err


@pytest.fixture
def no_model_loading(monkeypatch):
    """The command must fail before any model is loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    patch_load_model(monkeypatch, boom)


@pytest.fixture
def pruned(tiny_dir, tmp_path, calib_file):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.3")) == 0
    return out


# ----------------------------------------------------------------------------- tracebacks -> messages
def test_01_plan_with_a_non_integer_index(tiny_dir, pruned, tmp_path, capsys):
    plan = json.loads((pruned / "prune_plan.json").read_text())
    plan["layers"][0]["kv_groups"] = ["0"]
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(plan))
    _bad(["prune", "--model", str(tiny_dir), "--plan", str(bad), "--output", str(tmp_path / "o")], capsys,
         "--plan", "'0'", "whole numbers")


def test_02_plan_whose_recorded_counts_were_edited(tiny_dir, pruned, tmp_path, capsys):
    plan = json.loads((pruned / "prune_plan.json").read_text())
    plan["provenance"]["params_after"] = 123
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(plan))
    _bad(["prune", "--model", str(tiny_dir), "--plan", str(bad), "--output", str(tmp_path / "o")], capsys,
         "params_after 123", "but it gives")
    assert not (tmp_path / "o").exists()


def test_03_check_on_a_gpt2_folder_is_a_fail_table(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(d)
    err = _bad(["check", str(d)], capsys, "supported architecture", "gpt2", rc=1)
    assert "FAIL" in err


def test_04_check_on_invalid_config_json(tiny_dir, capsys):
    (tiny_dir / "config.json").write_text("{not json")
    _bad(["check", str(tiny_dir)], capsys, "config.json is not valid JSON")


def test_06_report_on_a_missing_folder(tmp_path, capsys):
    _bad(["report", str(tmp_path / "nope")], capsys, "no such folder")


def test_07_truncated_gguf_as_model(tmp_path, capsys):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05" * 20)   # the header, cut inside its metadata
    _bad(["eval", "--model", str(f)], capsys, "--model", "m.gguf")


def test_08_non_utf8_calibration_and_eval_files(tiny_dir, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 ".encode("latin-1") * 400)
    _bad(prune_args(tiny_dir, tmp_path / "o", f, "--pruning-ratio", "0.2"), capsys, "not UTF-8")
    _bad(["eval", "--model", str(tiny_dir), "--ppl", str(f)], capsys, "not UTF-8")
    assert not (tmp_path / "o").exists()


def test_09_10_ctrl_c_in_the_seed_scripts_exits_130_with_one_line(tmp_path):
    """SIGINT while evaluate_lora_model.py works: exit 130 and one 'interrupted' line, no traceback."""
    REPO = Path(__file__).resolve().parents[1]

    model = save_dense(tmp_path / "dense")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4000)
    code = ("import faulthandler, signal, sys, runpy, time, gqaprune.evaluate.perplexity as p\n"
            "faulthandler.register(signal.SIGUSR1)\n"   # the stacks, should it ever hang (below)
            # a job started in the background (`cmd &`) inherits SIGINT ignored, and Python then installs no
            # KeyboardInterrupt handler: restore the terminal's Ctrl-C, whatever launched pytest
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "orig = p.perplexity_of_ids\n"
            "def slow(*a, **k):\n    print('READY', flush=True); time.sleep(60)\n"
            "p.perplexity_of_ids = slow\n"
            f"sys.argv = ['evaluate_lora_model.py', '--pruned_model', {str(model)!r}, '--ppl', {str(text)!r},"
            f" '--output_dir', {str(tmp_path / 'ev')!r}]\n"
            f"runpy.run_path({str(REPO / 'scripts' / 'evaluate_lora_model.py')!r}, run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "READY" in line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)   # a second Ctrl-C while it shuts down changes nothing
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"no exit 180 s after Ctrl-C; its threads:\n{err[-4000:]}")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("evaluate_lora_model.py: interrupted"), err
    assert sum("interrupted" in ln for ln in lines) == 1, err
    assert not (tmp_path / "ev").exists()


# ----------------------------------------------------------------------------- wrong state / silent success
def test_11_a_diverged_finetune_is_not_a_finished_step(tmp_path):
    from gqaprune.errors import GQAPruneError
    from gqaprune.pipeline import RunOptions, _fingerprint, plan_steps, step_options

    root = tmp_path / "run"
    opts = RunOptions(model=str(save_dense(tmp_path / "dense")), output_root=str(root), profile="quick",
                      tasks=["piqa"])
    steps = step_options(opts, root)
    (root / "pruned").mkdir(parents=True)
    (root / "pruned" / "config.json").write_text("{}")
    (root / "lora").mkdir()
    (root / "lora" / "finetune_summary.json").write_text(json.dumps({"status": "diverged"}))
    (root / "run_steps.json").write_text(json.dumps(
        [{"step": n, "options": _fingerprint(steps[n])} for n in ("pruned", "lora")]))
    with pytest.raises(GQAPruneError, match="diverged"):
        plan_steps(opts, root, steps)
    lower = RunOptions(model=opts.model, output_root=str(root), profile="quick", tasks=["piqa"], learning_rate=1e-5)
    plan = plan_steps(lower, root, step_options(lower, root))
    assert plan["pruned"] == "skip" and plan["lora"] == "redo" and plan["merged"] == "run"


def test_12_explicit_flags_win_over_the_profile(tmp_path, capsys):
    from gqaprune.pipeline import RunOptions, step_options

    o = RunOptions(output_root=str(tmp_path / "r"), profile="quick", batch_size=16, micro_batch_size=4)
    lora = step_options(o, tmp_path / "r")["lora"]
    assert (lora.batch_size, lora.micro_batch_size, lora.cutoff_len) == (16, 4, 128)   # 128: quick's own
    # an invalid pair is refused, as post_training.py refuses it, before anything runs
    _bad(["run", "--output-root", str(tmp_path / "r2"), "--profile", "quick", "--batch-size", "10",
          "--micro-batch-size", "4"], capsys, "--batch_size 10")
    assert not (tmp_path / "r2").exists()


def test_13_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "a.txt").write_text("mine")
    _bad(["report", str(d)], capsys, "not the output root")
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]


def test_14_nan_weights_make_eval_fail_naming_the_layer(tmp_path, capsys):
    m = make_tiny_model()
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    d = tmp_path / "nan"
    m.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    _bad(["eval", "--model", str(d), "--ppl", str(text), "--seq-len", "16"], capsys, "decoder layer 1",
         "v_proj", "numerically broken")


def test_15_stride_0_is_refused(tiny_dir, capsys, no_model_loading):
    _bad(["eval", "--model", str(tiny_dir), "--stride", "0"], capsys, "--stride 0")


def test_16_negative_temperature_is_refused(tiny_dir, capsys, no_model_loading):
    _bad(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--temperature", "-1"], capsys, "--temperature -1")


def test_17_bench_prompt_longer_than_the_positions(tiny_dir, capsys):
    _bad(["bench", "--models", str(tiny_dir), "--prompt-len", "100000", "--new-tokens", "4", "--batch-sizes", "1"],
         capsys, "100004", "512 positions")


# ----------------------------------------------------------------------------- validated late -> early
def test_18_prune_name_typos_fail_before_the_model_loads(tiny_dir, tmp_path, calib_file, capsys, no_model_loading):
    out = tmp_path / "o"
    for args, what in (
            (["--calibration", "alpacca"], "--calibration alpacca"),
            (["--calibration", str(calib_file), "--eval-ppl", "wikitext2,wikitxet2"], "--eval-ppl wikitxet2"),
            (["--model", "smollm2-135n"], "smollm2-135n"),
            (["--plan", str(tmp_path / "nope.json")], "--plan"),
    ):
        base = ["prune", "--model", str(tiny_dir), "--output", str(out)]
        base += [] if "--plan" in args else ["--pruning-ratio", "0.2"]
        t0 = time.perf_counter()
        _bad(base + args, capsys, what)
        assert time.perf_counter() - t0 < 10
    assert not out.exists()


def test_19_eval_checks_every_name_before_the_first_ppl(tiny_dir, capsys, no_model_loading, data_env):
    _bad(["eval", "--model", str(tiny_dir), "--ppl", "wikitext2,ptbb"], capsys, "--ppl ptbb")
    _bad(["eval", "--model", str(tiny_dir), "--tasks", "piqa,arc_esay"], capsys, "arc_esay")


def test_20_run_checks_tasks_first(tmp_path, capsys):
    _bad(["run", "--output-root", str(tmp_path / "r"), "--tasks", "piqa,hellaswagg"], capsys, "hellaswagg")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- leftovers and risky defaults
def test_21_stale_temp_folder_of_a_killed_save_is_cleaned_by_the_next_write(tiny_dir, tmp_path, calib_file):
    leftover = tmp_path / ".out.tmp-0badf00d"           # what kill -9 during save leaves (see test_faults.py)
    leftover.mkdir()
    (leftover / "gqaprune_manifest.json").write_text(json.dumps({"tool": "gqaprune", "complete": False}))
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(prune_args(tiny_dir, tmp_path / "out", calib_file, "--pruning-ratio", "0.2")) == 0
    assert not leftover.exists() and (tmp_path / "out" / "config.json").is_file()


def test_22_prune_without_output_is_refused_unless_dry_run(tiny_dir, tmp_path, calib_file, capsys):
    args = [a for a in prune_args(tiny_dir, "X", calib_file, "--pruning-ratio", "0.2") if a not in ("--output", "X")]
    _bad(args, capsys, "--output DIR", "--dry-run")
    assert main(args + ["--dry-run"]) == 0
    assert "not saved: --dry-run" in capsys.readouterr().out


# ----------------------------------------------------------------------------- messages and help
def test_23_eval_help_prints_no_dict(capsys):
    REPO = Path(__file__).resolve().parents[1]

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "{'" not in capsys.readouterr().out
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate_lora_model.py"), "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "{'" not in out.stdout


def test_24_prune_help_is_grouped_and_says_what_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for heading in ("budget (one of --pruning-ratio, --target-params or --plan is required)", "criterion:",
                    "layout and allocation:", "quality steps:", "calibration:", "output:"):
        assert heading in text
    assert "--no-no-hooks" not in text and "--no-hooks" in text


def test_25_errors_name_the_flag_the_user_gave(tmp_path, capsys, no_model_loading):
    _bad(["finetune", "--prune-model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")], capsys,
         "--prune_model")
    _bad(["eval", "--model", "smollm2-135m", "--base-model", str(tmp_path / "nobase"), "--recovered",
          str(tmp_path / "norec")], capsys, "--base-model")


def test_26_val_set_size_advice_is_not_circular(tmp_path):
    from gqaprune.data.tokenized import check_val_split
    from gqaprune.errors import GQAPruneError

    with pytest.raises(GQAPruneError) as e:
        check_val_split(1, 1)
    assert "e.g. 1" not in str(e.value) and "--val_set_size 0" in str(e.value)
    with pytest.raises(GQAPruneError, match=r"e\.g\. 1\)"):
        check_val_split(5, 5)


def test_27_28_check_names_the_layer_whose_weights_disagree_with_the_config(pruned, capsys):
    cfg = json.loads((pruned / "config.json").read_text())
    cfg["num_key_value_heads"] = cfg["num_key_value_heads"] + 1    # config says one more KV head than the weights
    cfg["num_attention_heads"] = cfg["num_key_value_heads"] * 4
    (pruned / "config.json").write_text(json.dumps(cfg))
    err = _bad(["check", str(pruned), "--ppl-max-tokens", "256"], capsys, "layer 0", "config.json gives", rc=1)
    assert "BROKEN" in err
    assert "corr\n" not in err and "may be corr " not in err   # details are not cut mid-word


def test_29_prune_summary_takes_measured_figures_from_the_results_file_only(tiny_dir, tmp_path, calib_file, capsys,
                                                                            monkeypatch):
    import json
    import re

    from gqaprune.prune import recipes

    monkeypatch.setattr(recipes, "RESULTS", tmp_path / "none.json")
    assert main(prune_args(tiny_dir, tmp_path / "o", calib_file, "--pruning-ratio", "0.2")) == 0
    out = " ".join(capsys.readouterr().out.split())
    line = out.split("(no measured figures")[1].split(")")[0]
    assert "recipe fast" in line and "x dense" not in out and not re.search(r"\d\.\d", line)
    row = {"recipe": "fast", "model": "m", "ratio": 0.2, "x_dense_w128": 4.321, "x_dense_w2048": 5.0,
           "protocol": "p", "prune_s": 99.0, "machine": "a 2-core CPU"}
    (tmp_path / "r.json").write_text(json.dumps({"summary": [row]}))
    monkeypatch.setattr(recipes, "RESULTS", tmp_path / "r.json")
    assert main(prune_args(tiny_dir, tmp_path / "o2", calib_file, "--pruning-ratio", "0.2")) == 0
    assert "4.32x dense PPL" in " ".join(capsys.readouterr().out.split())


def test_30_kept_units_chart_has_integer_ticks_and_a_clear_legend():
    from gqaprune.prune.plan import PrunePlan
    from gqaprune.report import kept_units_figure

    n = 3
    plan = PrunePlan("per-layer", [[0], [0, 1], [1]], [list(range(5)), list(range(9)), list(range(3))],
                     {"q_per_kv": 2, "kv_per_layer": [2] * n, "mlp_per_layer": [10] * n}, {"reduction": 0.3})
    fig = kept_units_figure(plan, "t")
    fig.canvas.draw()
    for ax in fig.axes:
        assert all(float(t).is_integer() for t in ax.get_yticks()) and all(float(t).is_integer()
                                                                           for t in ax.get_xticks())
        leg = ax.get_legend().get_window_extent()
        assert leg.y0 >= ax.get_window_extent().y1 - 1   # above the plotting area: covers no bar


def test_eval_output_in_an_unwritable_place_fails_first(tiny_dir, tmp_path, capsys, no_model_loading):
    f = tmp_path / "file"
    f.write_text("x")
    _bad(["eval", "--model", str(tiny_dir), "--output", str(f / "sub")], capsys, "is a file")

