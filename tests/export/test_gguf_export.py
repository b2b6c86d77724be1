"""gqaprune export --format gguf: the file's metadata and tensors, checked with gguf's reader and transformers'
GGUF loader (no llama.cpp needed); every bad input is exit 2 with no partial file. The llama.cpp checks are in
test_gguf_llamacpp.py."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import save_dense, save_per_layer
from gqaprune.cli import main


def _fields(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}


def test_uniform_export_is_llama_and_loads_back_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_dense(tmp_path / "dense")
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--output", str(out), "--outtype", "f32"]) == 0
    r, kv = _fields(out)
    assert kv["general.architecture"] == "llama" and kv["llama.attention.head_count"] == 8
    assert kv["llama.attention.head_count_kv"] == 2 and kv["llama.feed_forward_length"] == 128
    assert kv["llama.attention.key_length"] == kv["llama.attention.value_length"] == kv["llama.rope.dimension_count"] == 8
    assert "gqaprune.version" in kv and r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 1 and len(r.fields["tokenizer.ggml.tokens"].data) == 320
    # transformers de-permutes q/k when it reads a GGUF: identical logits show the permutation is llama.cpp's
    g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (g(input_ids=x).logits - m(input_ids=x).logits).abs().max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "m.gguf"]   # no temp file, nothing in the source
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in (tmp_path / "dense").iterdir())


def test_per_layer_export_is_deci_with_per_layer_arrays(tmp_path):
    src = save_per_layer(tmp_path / "pl", kv=(1, 2), inter=(48, 128))
    out = tmp_path / "pl.gguf"
    assert main(["export", str(src), "--output", str(out), "--outtype", "f16"]) == 0
    r, kv = _fields(out)
    assert kv["general.architecture"] == "deci"
    assert list(kv["deci.attention.head_count"]) == [4, 8] and list(kv["deci.attention.head_count_kv"]) == [1, 2]
    assert list(kv["deci.feed_forward_length"]) == [48, 128] and kv["deci.attention.key_length"] == 8
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.attn_q.weight"].shape) == [64, 32] and list(t["blk.0.ffn_down.weight"].shape) == [48, 64]
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32" and t["blk.0.attn_q.weight"].tensor_type.name == "F16"


def test_q8_0_blocks_what_it_can_and_falls_back_to_f16(tmp_path):
    src = save_per_layer(tmp_path / "pl", kv=(1, 2), inter=(48, 128))   # ffn_down rows of 48: not a multiple of 32
    out = tmp_path / "q.gguf"
    assert main(["export", str(src), "--output", str(out), "--outtype", "q8_0"]) == 0
    r, kv = _fields(out)
    t = {x.name: x.tensor_type.name for x in r.tensors}
    assert t["blk.0.ffn_down.weight"] == "F16" and t["blk.1.ffn_down.weight"] == "Q8_0"
    assert t["blk.0.attn_q.weight"] == "Q8_0"


def test_permutation_is_a_per_head_regroup():
    from gqaprune.export.gguf import permute_rope

    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)   # 2 heads of 8 rows
    p = permute_rope(w, 2)
    # row h*d + 2i + j of the result is row h*d + j*d/2 + i of the source
    for h in range(2):
        for i in range(4):
            for j in range(2):
                assert torch.equal(p[h * 8 + 2 * i + j], w[h * 8 + j * 4 + i])


def test_llama3_rope_freqs_follow_the_scaling_rule():
    import math

    from gqaprune.export.gguf import llama3_rope_freqs

    cfg = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    f = llama3_rope_freqs(cfg, 128)
    assert f.shape == (64,) and f[0] == 1.0 and f[-1] == 8.0           # high frequencies kept, low ones divided
    assert all(1.0 <= x <= 8.0 for x in f) and list(f) == sorted(f)
    assert llama3_rope_freqs({"rope_theta": 1e4}, 64) is None
    # the boundary: wavelengths below original/high_freq_factor keep their frequency
    base = 500000.0
    wl = [2 * math.pi * base ** (i / 128) for i in range(0, 128, 2)]
    assert all((x == 1.0) == (w < 8192 / 4.0) for x, w in zip(f, wl))


@pytest.mark.parametrize("case", ["not_a_checkpoint", "adapter", "outtype", "quantize_type", "missing_folder",
                                  "exists", "foreign_exists", "truncated_safetensors", "gpt2"])
def test_bad_inputs_exit_2_and_leave_no_file(tmp_path, capsys, case):
    src = save_dense(tmp_path / "dense")
    out = tmp_path / "o.gguf"
    args = ["export", str(src), "--output", str(out)]
    expect = {"not_a_checkpoint": "no config.json", "adapter": "gqaprune merge", "outtype": "invalid choice",
              "quantize_type": "--quantize Q9_Z", "missing_folder": "does not exist", "exists": "exists",
              "foreign_exists": "gqaprune wrote", "truncated_safetensors": "", "gpt2": "model_type"}[case]
    if case == "not_a_checkpoint":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "adapter":
        (tmp_path / "lora").mkdir()
        (tmp_path / "lora" / "adapter_config.json").write_text("{}")
        args[1] = str(tmp_path / "lora")
    elif case == "outtype":
        args += ["--outtype", "f8"]
    elif case == "quantize_type":
        args += ["--quantize", "Q9_Z"]
    elif case == "missing_folder":
        args[3] = str(tmp_path / "nope" / "o.gguf")
    elif case in ("exists", "foreign_exists"):
        out.write_bytes(b"GGUF not ours")
        if case == "foreign_exists":
            args.append("--overwrite")
    elif case == "truncated_safetensors":
        f = src / "model.safetensors"
        f.write_bytes(f.read_bytes()[:500])
    elif case == "gpt2":
        cfg = json.loads((src / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (src / "config.json").write_text(json.dumps(cfg))
    before = out.read_bytes() if out.exists() else None
    with pytest.raises(SystemExit) if case == "outtype" else _nothing():
        rc = main(args)
        assert rc == 2
    err = capsys.readouterr().err
    assert expect.lower() in err.lower() and "Traceback" not in err, err
    assert (out.read_bytes() if out.exists() else None) == before           # an existing file is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.gguf")]   # no partial file


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_quantize_without_llama_cpp_says_how_to_install(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_llama(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    src = save_dense(tmp_path / "dense")
    assert main(["export", str(src), "--output", str(tmp_path / "o.gguf"), "--quantize", "Q4_K_M"]) == 2
    assert "pip install llama-cpp-python" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


def test_overwrite_replaces_only_a_gguf_gqaprune_wrote(tmp_path):
    src = save_dense(tmp_path / "dense")
    out = tmp_path / "o.gguf"
    assert main(["export", str(src), "--output", str(out)]) == 0
    first = out.read_bytes()
    assert main(["export", str(src), "--output", str(out), "--outtype", "f32", "--overwrite"]) == 0
    assert out.read_bytes() != first
