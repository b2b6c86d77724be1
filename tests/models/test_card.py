"""Model cards: every prune and merge output carries a README.md ready for the Hub."""

from __future__ import annotations

import re

from helpers import prune_args
from gqaprune.cli import main


def test_prune_writes_a_model_card(tiny_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "pruned"
    text = tmp_path / "eval.txt"
    text.write_text("Grouped query attention shares one key and value head. " * 40)
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.3", "--layout", "per-layer",
                           "--eval-ppl", str(text), "--ppl-seq-len", "32")) == 0
    card = (out / "README.md").read_text()
    front = re.match(r"^---\n(.*?)\n---\n", card, re.S).group(1)
    assert "library_name: transformers" in front and "- pruned" in front and "- gqaprune" in front
    assert "base_model:" in front
    assert "| before |" in card and "| after |" in card                      # parameters before and after
    assert "| layer | query heads | KV heads | MLP channels |" in card          # per-layer shape
    assert "window | stride | tokens scored" in card and "| 32 | 32 |" in card  # every PPL with its protocol
    assert "gqaprune prune" in card and "--layout per-layer" in card            # the exact command line
    assert "trust_remote_code=True" in card and "gqaprune export" in card       # how to load and export
    assert "README.md" in __import__("json").loads((out / "gqaprune_manifest.json").read_text())["entries"]


def test_alias_base_model_and_license_are_known():
    from gqaprune.models.card import base_model_info

    assert base_model_info("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
