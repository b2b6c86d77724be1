"""gqaprune.recover.merge: merged logits == adapter logits (per-layer and uniform), format kept, bad adapters refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import save_dense, save_per_layer
from gqaprune.errors import GQAPruneError
from gqaprune.recover.merge import merge_and_save_lora

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_adapter(base_dir: Path, lora_dir: Path, seed: int = 0, scale: float = 0.05, with_info: bool = True):
    """A LoRA adapter on ``base_dir`` with random non-zero B (as if trained), saved like finetune saves it."""
    from peft import LoraConfig, get_peft_model

    from gqaprune.models.adapters import ADAPTER_INFO, base_fingerprint
    from gqaprune.models.io import load_model

    model, tok = load_model(str(base_dir), dtype=torch.float32, device="cpu")
    fp = base_fingerprint(model, TARGETS)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    pm.save_pretrained(lora_dir)
    if with_info:
        (lora_dir / ADAPTER_INFO).write_text(json.dumps({"base_model": str(base_dir), "base_fingerprint": fp}))
    return pm.eval()


def _ids(n=2, L=16):
    return torch.randint(0, 320, (n, L), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
def test_merge_equals_adapter_and_keeps_format(tmp_path, layout):
    from gqaprune.models.io import load_model

    base = save_per_layer(tmp_path / "base") if layout == "per-layer" else save_dense(tmp_path / "base")
    pm = make_adapter(base, tmp_path / "lora")
    with torch.no_grad():
        want = pm(input_ids=_ids()).logits
    res = merge_and_save_lora(str(base), str(tmp_path / "lora"), str(tmp_path / "merged"))
    assert res.max_abs_diff <= res.tolerance and res.adapter_effect > 100 * res.tolerance
    assert res.n_merged_modules == 14 and res.per_layer == (layout == "per-layer")
    assert any("tolerance" in ln for ln in res.lines())
    # reload from disk: same class and layout, logits equal to the unmerged adapter model's
    out = tmp_path / "merged"
    cfg = json.loads((out / "config.json").read_text())
    merged, _ = load_model(str(out), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        got = merged(input_ids=_ids()).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    assert "lora" not in " ".join(n for n, _ in merged.named_parameters())
    if layout == "per-layer":
        assert cfg["model_type"] == "gqapruned_llama" and cfg["kv_heads_per_layer"] == [1, 2]
        assert cfg["intermediate_size_per_layer"] == [48, 128] and (out / "gqapruned.py").is_file()
        assert "auto_map" in cfg
    else:
        assert cfg["model_type"] == "llama" and not (out / "gqapruned.py").exists()
    info = json.loads((out / "merge_info.json").read_text())
    assert info["merged"]["max_abs_diff"] == res.max_abs_diff
    assert not list(tmp_path.glob(".merged*"))   # atomic: no temp folder left behind


def test_adapter_for_another_base_is_refused(tmp_path):
    per_layer = save_per_layer(tmp_path / "per_layer")
    dense = save_dense(tmp_path / "dense")
    make_adapter(dense, tmp_path / "lora_dense")
    # wrong shapes: dense adapter on the per-layer base
    with pytest.raises(GQAPruneError, match=r"does not fit.*k_proj: adapter output width 16, base 8"):
        merge_and_save_lora(str(per_layer), str(tmp_path / "lora_dense"), str(tmp_path / "m1"))
    # same shapes, different weights (another seed): caught by the fingerprint finetune writes
    other = save_dense(tmp_path / "dense_other", seed=5)
    with pytest.raises(GQAPruneError, match="different base"):
        merge_and_save_lora(str(other), str(tmp_path / "lora_dense"), str(tmp_path / "m2"))
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_missing_and_bad_adapters(tmp_path):
    base = save_dense(tmp_path / "dense")
    with pytest.raises(GQAPruneError, match="no such folder"):
        merge_and_save_lora(str(base), str(tmp_path / "nope"), str(tmp_path / "m"))
    run = tmp_path / "run"
    make_adapter(base, run / "checkpoint-4")
    with pytest.raises(GQAPruneError, match="newest is .*checkpoint-4"):
        merge_and_save_lora(str(base), str(run), str(tmp_path / "m"))
    with pytest.raises(GQAPruneError, match="pruned_model"):
        merge_and_save_lora(str(tmp_path / "missing_model"), str(run / "checkpoint-4"), str(tmp_path / "m"))
    # an existing output (not empty: outputs.check_output takes an empty folder as new) needs --overwrite
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("a user's file")
    with pytest.raises(GQAPruneError, match="overwrite"):
        merge_and_save_lora(str(base), str(run / "checkpoint-4"), str(tmp_path / "exists"))
    # NaN in the adapter: refused before anything is written
    from safetensors.torch import load_file, save_file

    nan_dir = tmp_path / "nan_lora"
    make_adapter(base, nan_dir)
    w = load_file(nan_dir / "adapter_model.safetensors")
    k = next(k for k in w if "lora_B" in k)
    w[k][0, 0] = float("nan")
    save_file(w, nan_dir / "adapter_model.safetensors")
    with pytest.raises(GQAPruneError, match="non-finite|NaN"):
        merge_and_save_lora(str(base), str(nan_dir), str(tmp_path / "m_nan"))
    assert not (tmp_path / "m_nan").exists()


def test_adapter_without_gqaprune_info_is_shape_checked_and_warned(tmp_path):
    base = save_per_layer(tmp_path / "base")
    make_adapter(base, tmp_path / "lora", with_info=False)
    res = merge_and_save_lora(str(base), str(tmp_path / "lora"), str(tmp_path / "m"), dtype="bfloat16")
    assert res.warnings and res.saved_dtype == "bfloat16"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    # the one dtype table: merge takes prune's spelling too (it used to refuse bf16)
    res = merge_and_save_lora(str(base), str(tmp_path / "lora"), str(tmp_path / "m2"), dtype="bf16")
    assert res.saved_dtype == "bfloat16"


def test_script_flags_and_exit_codes(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("merge_script", REPO / "scripts" / "merge_and_save_lora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = save_per_layer(tmp_path / "PRUNED")
    make_adapter(base, tmp_path / "LORA")
    argv = ["--pruned_model", str(base), "--lora_dir", str(tmp_path / "LORA"), "--output_dir",
            str(tmp_path / "MERGED")]
    assert script.main(argv) == 0
    assert "tolerance" in capsys.readouterr().out
    assert script.main(argv) == 2          # exists now
    assert "overwrite" in capsys.readouterr().err


def test_merge_a_finetune_output(tmp_path, monkeypatch):
    """finetune -> merge: the fingerprint finetune records accepts its own base, and the merge matches."""
    from helpers import write_records
    from gqaprune.recover.finetune import FinetuneOptions, finetune

    monkeypatch.setenv("GQAPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    base = save_per_layer(tmp_path / "base")
    ft = finetune(FinetuneOptions(prune_model=str(base), data_path=str(write_records(tmp_path / "d.jsonl")),
                                  output_dir=str(tmp_path / "lora"), batch_size=2, micro_batch_size=2, max_steps=2,
                                  val_set_size=0, cutoff_len=192, learning_rate=1e-2, warmup_steps=0))
    res = merge_and_save_lora(str(base), ft.adapter_dir, str(tmp_path / "merged"))
    assert not res.warnings and res.max_abs_diff <= res.tolerance and res.adapter_effect > 0
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["finetune_summary"]["global_step"] == 2
