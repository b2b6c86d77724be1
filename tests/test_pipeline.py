"""gqaprune run (the one-click pipeline) on a tiny model with the quick profile; resumable."""

import json

from gqaprune.cli import main


def test_run_quick_pipeline_and_skip_done_steps(tiny_dir, tmp_path, data_env, capsys):
    root = tmp_path / "run"
    args = ["run", "--model", str(tiny_dir), "--output-root", str(root), "--profile", "quick",
            "--tasks", "piqa", "--device", "cpu"]
    assert main(args) == 0
    for f in ("pruned/config.json", "lora/finetune_summary.json", "merged/config.json", "eval/eval.json", "REPORT.md"):
        assert (root / f).is_file(), f
    report = (root / "REPORT.md").read_text()
    assert "Quick profile" in report and "Verdict" in report and "window 128" in report
    steps = json.loads((root / "run_steps.json").read_text())
    assert [s["status"] for s in steps] == ["done"] * 4
    # a second run skips every finished step
    assert main(args) == 0
    steps = json.loads((root / "run_steps.json").read_text())
    assert all(s["status"].startswith("skipped") for s in steps)


def test_run_passes_prune_quality_options_and_refuses_a_mismatched_resume(tiny_dir, tmp_path, data_env, capsys):
    root = tmp_path / "run"
    base = ["run", "--model", str(tiny_dir), "--output-root", str(root), "--profile", "quick", "--tasks", "piqa",
            "--device", "cpu"]
    args = base + ["--layout", "per-layer", "--allocation", "sensitivity", "--compensate", "--num-samples", "8",
                   "--calibration-format", "text"]
    assert main(args) == 0
    plan = json.loads((root / "pruned" / "prune_plan.json").read_text())
    prov = plan["provenance"]
    assert plan["layout"] == "per-layer" and prov.get("compensation") and prov.get("sensitivity")
    assert "8 x 128 tokens" in prov["calibration"] and "plain text" in prov["calibration"]
    report = (root / "REPORT.md").read_text()
    assert "compensation (layer" in report and "sensitivity allocation" in report
    # resuming with other pruning options would silently reuse the old pruned model: refused (exit 2)
    capsys.readouterr()
    assert main(base + ["--pruning-ratio", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "pruning-ratio 0.2 -> 0.3" in err and "--overwrite" in err
    assert json.loads((root / "run_options.json").read_text())["compensate"] is True  # untouched
    # options that do not change results may differ on resume
    assert main(args + ["--wandb-project", ""]) == 0
