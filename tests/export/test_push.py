"""gqaprune push: a clear message where the Hub is unreachable (huggingface_hub's own offline mode)."""

from __future__ import annotations

from helpers import prune_args
from gqaprune.cli import main


def test_push_offline_says_so_and_exits_2(tiny_dir, tmp_path, calib_file, capsys, monkeypatch):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2")) == 0
    capsys.readouterr()
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(out), "--repo-id", "someone/tiny-pruned"]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and "Traceback" not in err


def test_push_refuses_bad_input_before_contacting_the_hub(tiny_dir, tmp_path, capsys):
    assert main(["push", str(tmp_path), "--repo-id", "a/b"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert main(["push", str(tiny_dir), "--repo-id", "no-owner"]) == 2
    assert "owner/name" in capsys.readouterr().err
