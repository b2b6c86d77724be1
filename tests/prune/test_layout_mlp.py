"""--layout per-layer-mlp: the same KV groups in every layer, MLP widths per layer, saved as DeciLM
block_configs (model_type nemotron-nas) for vLLM's DeciLMForCausalLM; loads in transformers with its code."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from helpers import make_tiny_model, make_tokenizer
from gqaprune.errors import GQAPruneError
from gqaprune.models.io import save_checkpoint
from gqaprune.models.layout import model_layout
from gqaprune.prune.budget import Budget
from gqaprune.prune.plan import make_plan
from gqaprune.prune.surgery import apply_plan

RELOAD = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert "gqaprune" not in sys.modules
with torch.no_grad():
    print(json.dumps({"cls": type(m).__name__, "logits": m(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits.tolist()}))
"""


def _model():
    return make_tiny_model(intermediate_size=768, num_hidden_layers=3)


def _plan(m, **kw):
    lay = model_layout(m)
    sc = [{"kv": torch.rand(s.n_kv, generator=torch.Generator().manual_seed(i)),
           "mlp": torch.rand(s.n_mlp, generator=torch.Generator().manual_seed(9 + i))} for i, s in enumerate(lay.layers)]
    return make_plan(lay, sc, Budget(ratio=0.3).resolve(lay), layout_kind="per-layer-mlp", round_mlp_to=256, **kw)


def test_same_kv_everywhere_and_deci_widths(tmp_path):
    m = _model()
    plan = _plan(m, layer_weights={0: 0.5, 1: 1.0, 2: 2.0})
    assert len(set(plan.kept_kv)) == 1 and len(set(plan.kept_mlp)) > 1
    assert all(w % 256 == 0 for w in plan.kept_mlp)
    pruned = apply_plan(copy.deepcopy(m), plan)
    cfg = pruned.config
    assert cfg.model_type == "nemotron-nas" and cfg.architectures == ["DeciLMForCausalLM"]
    assert [b.attention.n_heads_in_group for b in cfg.block_configs] == [4, 4, 4]   # vLLM reads attributes
    assert cfg.mlp_widths() == plan.kept_mlp == [layer.mlp.gate_proj.out_features for layer in pruned.model.layers]
    out = save_checkpoint(pruned, make_tokenizer(), tmp_path / "deci", plan=plan.to_dict())
    saved = json.loads((out / "config.json").read_text())
    assert isinstance(saved["block_configs"][0]["ffn"]["ffn_mult"], float) and (out / "gqapruned_deci.py").is_file()
    x = [[5, 9, 44, 7, 3, 120, 8]]
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), json.dumps(x)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ref = pruned(input_ids=torch.tensor(x)).logits
    assert res["cls"] == "GQAPrunedDeciForCausalLM" and (torch.tensor(res["logits"]) - ref).abs().max() < 1e-5


def test_widths_deci_cannot_express_are_refused():
    from gqaprune.prune.options import PruneOptions

    with pytest.raises(GQAPruneError, match="multiples of 256"):
        PruneOptions(recipe="fast", pruning_ratio=0.2, layout="per-layer-mlp", round_mlp_to=64)
    assert PruneOptions(recipe="fast", pruning_ratio=0.2, layout="per-layer-mlp").round_mlp_to == 256   # the default there


def test_allocation_search_keeps_the_kv_groups_equal():
    from gqaprune.prune.allocate.search import search_allocation

    m = _model().eval()
    plan = _plan(m)
    lay = model_layout(m)
    sc = [{"kv": torch.rand(s.n_kv), "mlp": torch.rand(s.n_mlp)} for s in lay.layers]
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    new, rep = search_allocation(m, lay, sc, plan, ids, Budget(ratio=0.3).resolve(lay), evaluations=20, samples=4,
                                 round_mlp_to=256, progress=False)
    assert len(set(new.kept_kv)) == 1 and all(w % 256 == 0 for w in new.kept_mlp)
    assert all(a["kind"] == "mlp" for a in rep["accepted"])
    with pytest.raises(GQAPruneError, match="per-layer-mlp"):
        search_allocation(m, lay, sc, plan, ids, Budget(ratio=0.3).resolve(lay), evaluations=1, samples=4,
                          moves="mixed", progress=False)


def test_rounded_widths_keep_the_budget():
    """30 layers that all want 968 of 1536 channels: rounding each to its nearest 128 would keep 1024 everywhere
    (56 x 30 channels over budget); the total must instead stay within half a step of the target."""
    from gqaprune.prune.budget import _round_keeping_total

    sizes = {i: 1536 for i in range(30)}
    rm = {i: 1536 - 968 for i in range(30)}
    rm[0], rm[1] = 1536 - 1394, 1536 - 1394          # two layers that keep more, as the sensitivity allocation gives
    total = sum(rm.values())
    for step in (64, 128, 256):
        out = _round_keeping_total(sizes, rm, total, step)
        kept = [1536 - out[i] for i in sizes]
        assert all(k % step == 0 and step <= k <= 1536 for k in kept), (step, kept)
        assert abs(sum(out.values()) - total) <= step / 2, (step, sum(out.values()) - total)
        assert max(kept) - min(kept) <= 1394 - 968 + step   # the allocation's shape is kept
