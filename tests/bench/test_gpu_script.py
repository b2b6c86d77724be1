"""benchmarks/gpu_llama3_8b_shape.py runs on CPU with --tiny (how CI tests it)."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_script_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_script", REPO / "benchmarks" / "gpu_llama3_8b_shape.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tiny"
    assert mod.main(["--tiny", "--samples", "4", "--seq-len", "32", "--no-bench", "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in rep["prune"]] == ["uniform 20%", "uniform 50%", "uniform 50% mlp%128",
                                                  "per-layer 20%", "per-layer 50%", "per-layer 20% mlp%128",
                                                  "per-layer 50% mlp%128", "per-layer-mlp 20% mlp%256",
                                                  "per-layer-mlp 50% mlp%256"]
    for r in rep["prune"]:   # the tiny model's MLP (896) takes only 3 steps of 256: coarse
        assert abs(r["reduction"] - r["ratio"]) < (0.1 if (r["round_mlp_to"] or 0) >= 256 else 0.03), r
    for r in rep["prune"]:
        if r["round_mlp_to"]:
            assert all(w % r["round_mlp_to"] == 0 for w in r["mlp_per_layer_range"]), r
    assert {r["class"] for r in rep["prune"] if r["layout"] == "per-layer-mlp"} <= {"GQAPrunedDeciForCausalLM",
                                                                                  "LlamaForCausalLM"}
    assert "Taylor calibration" in out.with_suffix(".md").read_text()
