"""gqaprune.bench: rows per model x batch, FLOPs ratios from the formula, decode loop == generate."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_model, tiny_config
from gqaprune.bench.command import BenchOptions, bench, bench_models, model_shape, run_once, to_markdown
from gqaprune.errors import GQAPruneError

P, N = 32, 8


def _per_layer_model(seed: int = 1):
    """A per-layer pruned tiny model: layer 0 keeps 1 of 2 KV groups and 64 of 128 MLP channels."""
    from gqaprune.models.pruned_gqa import GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM

    cfg = GQAPrunedLlamaConfig(**tiny_config().to_dict())
    cfg.kv_heads_per_layer = [1, 2]
    cfg.intermediate_size_per_layer = [64, 96]
    torch.manual_seed(seed)
    return GQAPrunedLlamaForCausalLM(cfg).eval()


def _uniform_model():
    """Uniform 50%: 4 query heads, 1 KV group, MLP 64 in both layers (head_dim stays 8)."""
    return make_tiny_model(seed=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64)


def _expected_flops(layers, vocab=320, hidden=64, head_dim=8, r=4, p=P, n=N):
    """FLOPs per token from config numbers alone; ``layers`` = [(kv_groups, mlp_width), ...]."""
    m_layers = 0
    width = 0
    for kv, inter in layers:
        q = kv * r * head_dim
        m_layers += hidden * q * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter  # q,o + k,v + gate,up,down
        width += q
    head = vocab * hidden
    prefill = 2 * m_layers + 2 * head / p + 4 * width * (p + 1) / 2
    decode = 2 * m_layers + 2 * head + 4 * width * (p + (n + 1) / 2)
    return prefill, decode


@pytest.fixture(scope="module")
def result():
    models = [("dense", make_tiny_model()), ("per-layer", _per_layer_model()), ("uniform", _uniform_model())]
    opts = BenchOptions(prompt_len=P, new_tokens=N, batch_sizes=[1, 2], repeats=3, warmup=1)
    return bench_models(models, opts)


def test_rows_for_every_model_and_batch(result):
    assert [(r.model, r.batch) for r in result.rows] == [
        (m, b) for b in (1, 2) for m in ("dense", "per-layer", "uniform")
    ]
    for r in result.rows:
        assert r.prefill_tok_s > 0 and r.decode_tok_s > 0
        assert len(r.prefill_times) == 3 and len(r.decode_times) == 3
        assert r.prefill_tok_s == pytest.approx(r.batch * P / r.prefill_s)
        assert r.decode_tok_s == pytest.approx(r.batch * N / r.decode_s)
        assert r.peak_mem_bytes >= r.weights_bytes > 0
        assert r.device == "cpu" and r.dtype == "float32"


def test_flops_ratio_matches_formula(result):
    by = {(r.model, r.batch): r for r in result.rows}
    dense_pf, dense_dec = _expected_flops([(2, 128), (2, 128)])
    cases = {"dense": [(2, 128), (2, 128)], "per-layer": [(1, 64), (2, 96)], "uniform": [(1, 64), (1, 64)]}
    for name, layers in cases.items():
        pf, dec = _expected_flops(layers)
        r = by[(name, 2)]
        assert r.flops_prefill_per_token == pytest.approx(pf)
        assert r.flops_decode_per_token == pytest.approx(dec)
        assert r.flops_ratio_prefill == pytest.approx(pf / dense_pf)
        assert r.flops_ratio_decode == pytest.approx(dec / dense_dec)
    for name in ("per-layer", "uniform"):
        assert by[(name, 1)].flops_ratio_prefill < 1 and by[(name, 1)].flops_ratio_decode < 1
    assert by[("dense", 1)].flops_ratio_prefill == 1.0 and by[("dense", 1)].prefill_speedup == 1.0


def test_speedup_and_efficiency_relative_to_baseline(result):
    by = {(r.model, r.batch): r for r in result.rows}
    for (name, b), r in by.items():
        base = by[("dense", b)]
        assert r.prefill_speedup == pytest.approx(r.prefill_tok_s / base.prefill_tok_s)
        assert r.decode_speedup == pytest.approx(r.decode_tok_s / base.decode_tok_s)
        assert r.prefill_efficiency == pytest.approx(r.prefill_speedup * r.flops_ratio_prefill)


def test_params_counted(result):
    by = {(r.model, r.batch): r for r in result.rows}
    assert by[("dense", 1)].params == sum(p.numel() for p in make_tiny_model().parameters())
    assert by[("uniform", 1)].params < by[("per-layer", 1)].params < by[("dense", 1)].params


def test_markdown_and_json(result, tmp_path):
    md = result.to_markdown()
    for name in ("dense", "per-layer", "uniform"):
        assert f"| {name} |" in md
    assert "prefill tok/s" in md and "FLOPs ratio prefill" in md and "decode speedup" in md
    assert md == to_markdown(result.rows, result.meta)
    jpath, mpath = result.save(tmp_path / "sub" / "bench.md")
    assert jpath.name == "bench.json" and mpath.read_text() == md
    data = json.loads(jpath.read_text())
    assert len(data["rows"]) == 6 and data["meta"]["baseline"] == "dense"
    assert data["rows"][0]["prefill_tok_s"] > 0


def test_decode_loop_matches_generate():
    """The timed loop is real KV-cached greedy decoding: same tokens as generate()."""
    model = make_tiny_model()
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    _, _, toks = run_once(model, ids, new_tokens=6)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, min_new_tokens=7,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(toks, gen[:, 16:])


def test_model_shape_per_layer():
    s = model_shape(_per_layer_model())
    assert s.n_layers == 2
    assert s.attn_width == (1 + 2) * 4 * 8
    assert s.head_matmul_params == 320 * 64


def test_bad_options_raise():
    models = [("dense", make_tiny_model())]
    with pytest.raises(GQAPruneError, match="batch-sizes"):
        bench_models(models, BenchOptions(batch_sizes=[0]))
    with pytest.raises(GQAPruneError, match="repeats"):
        bench_models(models, BenchOptions(repeats=0))
    with pytest.raises(GQAPruneError, match="no models"):
        bench_models([], BenchOptions(prompt_len=P, new_tokens=N))
    with pytest.raises(GQAPruneError, match="--models"):
        bench(BenchOptions())


def test_bench_loads_refs(tiny_dir, tmp_path, monkeypatch):
    """bench() loads references through model_io and writes OUT.json + OUT.md."""
    pytest.importorskip("gqaprune.models.io")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "res.json"
    opts = BenchOptions(models=[str(tiny_dir), str(tiny_dir)], prompt_len=8, new_tokens=2, batch_sizes=[1],
                        repeats=1, device="cpu", dtype="fp32", output=str(out))
    res = bench(opts)
    assert [r.model for r in res.rows] == [str(tiny_dir), f"{tiny_dir} #2"]
    assert out.exists() and out.with_suffix(".md").exists()
    assert res.rows[1].flops_ratio_prefill == pytest.approx(1.0)
