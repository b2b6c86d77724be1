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
