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
                                                  "per-layer 20%", "per-layer 50%"]
    for r in rep["prune"]:
        assert abs(r["reduction"] - r["ratio"]) < 0.03
    assert rep["prune"][2]["mlp_per_layer_range"][0] % 128 == 0
    assert "Taylor calibration" in out.with_suffix(".md").read_text()
