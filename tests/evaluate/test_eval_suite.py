"""evaluate_lora_model.py / gqaprune eval --base-model: original vs pruned vs recovered, verdict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from gqaprune.cli import main

REPO = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _adapter(pruned_dir, out):
    from peft import LoraConfig, get_peft_model

    from gqaprune.models.io import load_model

    model, _ = load_model(str(pruned_dir))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    pm.save_pretrained(out)
    return out


def test_base_model_comparison(tiny_dir, tmp_path, data_env, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--output", str(pruned), "--calibration", str(text),
                 "--num-samples", "4", "--seq-len", "16", "--pruning-ratio", "0.3", "--criterion", "magnitude",
                 "--recipe", "fast"]) == 0
    lora = _adapter(pruned, tmp_path / "lora")
    out = tmp_path / "ev"
    rc = _script("evaluate_lora_model").main([
        "--pruned_model", str(pruned), "--lora_dir", str(lora), "--base_model", str(tiny_dir), "--device", "cpu",
        "--ppl", str(text), "--seq_len", "16", "--tasks", "piqa", "--limit", "4", "--output_dir", str(out)])
    assert rc == 0
    d = json.loads((out / "eval.json").read_text())
    assert [r["adapter"] for r in d["results"]] == [None, None, str(lora)]
    comp = d["comparison"]
    assert comp["scaled"] is True and comp["verdict"] in ("below minimum", "minimum", "ideal", "perfect")
    ppl = [r["ppl"][0]["ppl"] for r in d["results"]]
    assert len(set(ppl)) == 3  # three different models were really evaluated
    md = (out / "eval.md").read_text()
    assert "recovery" in md.lower() and "scaled" in md.lower() and "piqa" in md


def test_base_model_needs_recovered(tiny_dir, capsys):
    rc = main(["eval", "--model", str(tiny_dir), "--base-model", str(tiny_dir)])
    assert rc == 2 and "--adapter" in capsys.readouterr().err
