"""Exported GGUFs run in llama.cpp itself (llama-cpp-python) and give transformers' logits.

Skipped, with the reason, where llama-cpp-python is not installed (CI installs it: .ci/run).
Quantized files are loaded in a subprocess, so a crash in llama.cpp fails the test instead of
killing the test run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import save_dense, save_per_layer
from gqaprune.cli import main

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

IDS = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()


def _hf_logits(folder) -> np.ndarray:
    from gqaprune.models.io import load_model

    m, _ = load_model(str(folder), dtype="fp32", device="cpu")
    with torch.no_grad():
        return m(input_ids=torch.tensor([IDS])).logits[0].numpy()


def _export(src, out, *extra):
    before = sorted(p.name for p in src.iterdir())
    assert main(["export", str(src), "--output", str(out), *extra]) == 0
    assert sorted(p.name for p in src.iterdir()) == before, "the export wrote into the checkpoint folder"
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("kind", ["uniform", "per-layer", "per-layer-middle-differs", "rope-theta", "llama3-rope"])
def test_llama_cpp_logits_equal_transformers_in_f32(tmp_path, kind):
    from gqaprune.bench import llamacpp

    if kind == "uniform":
        src = save_dense(tmp_path / "m")
    elif kind in ("rope-theta", "llama3-rope"):   # transformers 5 writes these as rope_parameters
        from helpers import make_tiny_model, make_tokenizer

        rp = {"rope_type": "default", "rope_theta": 100000.0} if kind == "rope-theta" else {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        m = make_tiny_model(rope_parameters=rp)
        src = tmp_path / "m"
        m.save_pretrained(src)
        make_tokenizer().save_pretrained(src)
    elif kind == "per-layer":
        src = save_per_layer(tmp_path / "m", kv=(1, 2), inter=(48, 128))
    else:   # a layer whose KV groups differ from both neighbours
        from helpers import make_per_layer_model, make_tokenizer
        from gqaprune.models.io import save_checkpoint

        src = save_checkpoint(make_per_layer_model(kv=(2, 1, 2), inter=(128, 64, 96)), make_tokenizer(),
                              tmp_path / "m")
    out = tmp_path / "m.gguf"
    _export(src, out, "--outtype", "f32")
    llm = llamacpp.load(out, n_ctx=64)
    got, ref = llamacpp.logits(llm, IDS), _hf_logits(src)
    assert np.abs(got - ref).max() <= 1e-4, np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # incremental decode (one token at a time, KV cache) gives the batched logits
    llm.reset()
    for t in IDS:
        llm.eval([t])
    assert np.abs(np.array(llm.scores[: len(IDS)]) - got).max() <= 1e-4


def test_llama_cpp_perplexity_matches_the_project_protocol(tmp_path):
    from gqaprune.bench import llamacpp
    from gqaprune.evaluate.perplexity import perplexity_of_ids
    from gqaprune.models.io import load_model

    src = save_per_layer(tmp_path / "m", kv=(1, 2), inter=(48, 128))
    out = tmp_path / "m.gguf"
    _export(src, out, "--outtype", "f32")
    ids = torch.randint(3, 300, (16 * 4 + 5,), generator=torch.Generator().manual_seed(1))
    m, _ = load_model(str(src), dtype="fp32", device="cpu")
    ref, n_ref = perplexity_of_ids(m, ids, seq_len=16, progress=False)
    got, n = llamacpp.perplexity(llamacpp.load(out, n_ctx=64), ids.tolist(), seq_len=16)
    assert n == n_ref == 4 * 15 and abs(got - ref) < 1e-5


_QUANT_RUN = r"""
import json, sys
import numpy as np
from gqaprune.bench import llamacpp
llm = llamacpp.load(sys.argv[1], n_ctx=64)
x = llamacpp.logits(llm, json.loads(sys.argv[2]))
print(json.dumps({"finite": bool(np.isfinite(x).all()), "argmax": x.argmax(-1).tolist()}))
"""


@pytest.mark.parametrize("how", [("--outtype", "q8_0"), ("--quantize", "Q4_K_M"), ("--quantize", "Q8_0")])
def test_quantized_files_run_in_llama_cpp(tmp_path, how):
    src = save_dense(tmp_path / "m")
    out = tmp_path / "m.gguf"
    _export(src, out, *how)
    target = out if how[0] == "--outtype" else out.with_name(f"m.{how[1]}.gguf")
    assert target.is_file()
    proc = subprocess.run([sys.executable, "-c", _QUANT_RUN, str(target), json.dumps(IDS)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"llama.cpp crashed on {target.name} (rc {proc.returncode}): {proc.stderr[-2000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["finite"] and len(res["argmax"]) == len(IDS)


def test_bench_gguf_times_quantized_files_and_records_the_repack_setting(tmp_path):
    """`gqaprune bench --engine llama.cpp` on a q8_0 file: the timings are there, and the meta says whether
    llama.cpp's weight repacking was off (an AMX CPU, compat/llama_cpp.py) so the speeds name it."""
    from gqaprune.bench.command import BenchOptions, bench_gguf
    from gqaprune.compat.llama_cpp import repack_off

    out = tmp_path / "m.gguf"
    _export(save_dense(tmp_path / "m"), out, "--outtype", "q8_0")
    res = bench_gguf(BenchOptions(models=[str(out)], engine="llama.cpp", prompt_len=8, new_tokens=4, repeats=1, batch_sizes=[1],
                                  threads=1))
    assert res.meta["llama_cpp_repack"] == ("off (AMX CPU; compat/llama_cpp.py)" if repack_off() else "on")
    assert len(res.rows) == 1
