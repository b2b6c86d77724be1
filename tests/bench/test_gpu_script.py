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


def test_gpu_vllm_script_is_ready_and_says_what_vllm_cannot_serve(tmp_path, capsys):
    """benchmarks/gpu_vllm.py: without vllm it says what it needs (exit 2); it refuses per-layer folders as vLLM
    would, and takes uniform and per-layer-mlp ones."""
    import json as _json

    spec = importlib.util.spec_from_file_location("gpu_vllm", REPO / "benchmarks" / "gpu_vllm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for mt, ok in (("gqapruned_llama", False), ("llama", True), ("mistral", True), ("nemotron-nas", True)):
        d = tmp_path / mt
        d.mkdir()
        (d / "config.json").write_text(_json.dumps({"model_type": mt}))
        assert (mod.servable(d) == "") is ok
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert mod.main(["--dense", str(tmp_path / "llama"), "--models", str(tmp_path / "mistral")]) == 2
        assert "needs vllm" in capsys.readouterr().err
