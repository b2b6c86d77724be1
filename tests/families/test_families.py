"""Every supported family, tiny random models built from its transformers config (tests/helpers.py FAMILY_CONFIGS):

1. identity: a plan that keeps every unit reproduces the logits;
2. equivalence: zeroing KV groups / MLP channels in the dense model, then pruning exactly those units,
   gives the same logits (the test that catches a mis-sliced bias, norm or fused block);
3. both layouts save and reload in a fresh process that never imports gqaprune (uniform through the stock
   class, per-layer through trust_remote_code), with the logits of the in-memory model and Q:KV kept;
4. the pipeline: every criterion, compensation, the allocation and split searches, plan replay, and LoRA
   fine-tuning then merge.
The maximum |Δlogit| of 1-3 per family is what benchmarks/families.py tables.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from gqaprune.models.family import FAMILIES, family_of
from gqaprune.models.layout import model_layout, q_rows
from gqaprune.prune.plan import PrunePlan
from gqaprune.prune.surgery import apply_plan
from helpers import FAMILY_CONFIGS, make_family_model, make_tokenizer

FAMILY_NAMES = list(FAMILY_CONFIGS)
IDS = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))   # longer than the sliding windows


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def plan_removing(layout, kv_rm: dict[int, list[int]], ch_rm: dict[int, list[int]], kind: str) -> PrunePlan:
    """A plan that removes exactly these units (layer -> KV groups / channels)."""
    from gqaprune.prune.plan import source_shape

    kv = [[g for g in range(s.n_kv) if g not in kv_rm.get(i, [])] for i, s in enumerate(layout.layers)]
    mlp = [[c for c in range(s.n_mlp) if c not in ch_rm.get(i, [])] for i, s in enumerate(layout.layers)]
    return PrunePlan(layout=kind, kv_groups=kv, mlp_channels=mlp, source_shape=source_shape(layout), provenance={})


def zero_units(model, kv_rm: dict[int, list[int]], ch_rm: dict[int, list[int]]) -> None:
    """Remove units from a dense model by zeroing the columns that consume them (o_proj, down_proj)."""
    lay = model_layout(model)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if kv_rm.get(i):
                layer.self_attn.o_proj.weight[:, q_rows(kv_rm[i], lay.q_per_kv, lay.head_dim)] = 0
            if ch_rm.get(i):
                layer.mlp.down_proj.weight[:, ch_rm[i]] = 0


# uniform: the same units everywhere; per-layer: a layer that differs from both neighbours
CUTS = {"uniform": ({i: [1] for i in range(6)}, {i: [3, 50, 95] for i in range(6)}),
        "per-layer": ({1: [0]}, {0: [5], 2: list(range(40))})}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_identity_plan_reproduces_the_logits(family):
    model = make_family_model(family)
    ref = logits(model)
    lay = model_layout(model)
    assert lay.family == family and family_of(model).name == family
    pruned = apply_plan(copy.deepcopy(model), plan_removing(lay, {}, {}, "uniform"))
    assert type(pruned.config).__name__ == type(model.config).__name__   # the stock class again
    assert (logits(pruned) - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", list(CUTS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruned_equals_zeroed(family, kind):
    model = make_family_model(family)
    kv_rm, ch_rm = CUTS[kind]
    zeroed = copy.deepcopy(model)
    zero_units(zeroed, kv_rm, ch_rm)
    pruned = apply_plan(copy.deepcopy(model), plan_removing(model_layout(model), kv_rm, ch_rm, kind))
    assert (logits(pruned) - logits(zeroed)).abs().max().item() <= 1e-5
    assert (logits(pruned) - logits(model)).abs().max().item() > 1e-3   # the cut did change the model
    lay = model_layout(pruned)
    assert lay.q_per_kv == model_layout(model).q_per_kv
    want = "stock" if kind == "uniform" else "per-layer"
    assert (pruned.config.model_type == family) == (want == "stock"), pruned.config.model_type


_RELOAD = r"""
import json, sys, torch
assert "gqaprune" not in sys.modules
from transformers import AutoModelForCausalLM
out = {}
for folder in json.loads(sys.argv[1]):
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        lg = m(input_ids=ids).logits
    d = m.config.head_dim
    qkv = [(l.self_attn.o_proj.in_features // d, ) for l in m.model.layers]
    out[folder] = {"logits": lg.tolist(), "class": type(m).__name__, "module": type(m).__module__,
                   "q_heads": [x[0] for x in qkv]}
assert not any(k.startswith("gqaprune") for k in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family in both layouts, pruned, saved, and reloaded in one fresh process without gqaprune."""
    from gqaprune.models.io import save_checkpoint

    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILY_NAMES:
        model = make_family_model(family)
        for kind, (kv_rm, ch_rm) in CUTS.items():
            pruned = apply_plan(copy.deepcopy(model), plan_removing(model_layout(model), kv_rm, ch_rm, kind))
            folder = save_checkpoint(pruned, make_tokenizer(), root / f"{family}-{kind}")
            made[(family, kind)] = (str(folder), pruned, model_layout(model).q_per_kv)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps([v[0] for v in made.values()]),
                           json.dumps(IDS.tolist())], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return made, json.loads(proc.stdout)


@pytest.mark.parametrize("kind", list(CUTS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_reload_without_gqaprune(saved, family, kind):
    made, reloaded = saved
    folder, pruned, r = made[(family, kind)]
    got = reloaded[folder]
    assert (torch.tensor(got["logits"]) - logits(pruned)).abs().max().item() <= 1e-5
    if kind == "uniform":   # the stock class, no remote code
        assert got["module"].startswith("transformers.models."), got
    else:
        assert got["class"].startswith("GQAPruned") and not got["module"].startswith("transformers.models."), got
    n_kv = [len(x) for x in plan_removing(model_layout(make_family_model(family)), *CUTS[kind], kind).kv_groups]
    assert got["q_heads"] == [k * r for k in n_kv]   # Q:KV kept in every layer


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_criterion_and_the_quality_steps_run(family, calib_ids):
    from gqaprune.prune.budget import Budget
    from gqaprune.prune.options import PruneOptions
    from gqaprune.prune.score import CRITERIA, score_units
    from gqaprune.prune.steps import prune_model

    model = make_family_model(family)
    lay = model_layout(model)
    for name in CRITERIA:
        scores = score_units(model, lay, name, calib_ids, progress=False)
        assert [len(s["kv"]) for s in scores] == [s.n_kv for s in lay.layers]
        assert all(torch.isfinite(s["mlp"]).all() for s in scores), name
    opts = PruneOptions(recipe="fast", pruning_ratio=0.3, layout="per-layer", criterion="taylor", allocation="search",
                        search_evaluations=4, search_samples=2, sensitivity_samples=2, split="search",
                        compensate=True, calib_batch_size=2, dry_run=True, device="cpu", dtype="fp32")
    pruned, plan = prune_model(copy.deepcopy(model), opts, calib_ids, progress=False)
    assert abs(plan.provenance["reduction"] - 0.3) < 0.05
    assert torch.isfinite(logits(pruned)).all()
    # plan replay: the saved plan applied to the original gives the same model (compensation aside: off here)
    plain = PruneOptions(recipe="fast", pruning_ratio=0.3, layout="per-layer", criterion="magnitude", dry_run=True, device="cpu",
                         dtype="fp32")
    first, plan = prune_model(copy.deepcopy(model), plain, None, progress=False)
    again = apply_plan(copy.deepcopy(model), PrunePlan.from_dict(json.loads(plan.to_json())))
    assert torch.equal(logits(first), logits(again))
    assert Budget(ratio=0.3).resolve(lay).removed > 0


@pytest.fixture
def calib_ids():
    return torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_then_merge_equals_the_adapter(family, tmp_path):
    from gqaprune.models.io import save_checkpoint
    from gqaprune.recover.finetune import finetune
    from gqaprune.recover.merge import merge_and_save_lora
    from helpers import finetune_options, write_records

    model = make_family_model(family)
    pruned = apply_plan(model, plan_removing(model_layout(model), *CUTS["per-layer"], "per-layer"))
    base = save_checkpoint(pruned, make_tokenizer(), tmp_path / "base")
    res = finetune(finetune_options(tmp_path, base, write_records(tmp_path / "d.jsonl", n=16), max_steps=1,
                                    eval_steps=1, save_steps=1, val_set_size=4, batch_size=2, micro_batch_size=2,
                                    cutoff_len=128))
    want = set(FAMILIES[family].lora_targets)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == want
    merged = merge_and_save_lora(str(base), str(tmp_path / "out"), str(tmp_path / "merged"))
    assert merged.max_abs_diff <= merged.tolerance and merged.adapter_effect > 0
    assert res is not None


@pytest.mark.parametrize("bad", ["gpt2", "bert", "mixtral"])
def test_other_families_are_refused_with_the_supported_list(bad):
    from transformers import AutoConfig

    from gqaprune.errors import GQAPruneError
    from gqaprune.models.io import check_architecture

    cfg = AutoConfig.for_model(bad)
    with pytest.raises(GQAPruneError) as e:
        check_architecture(cfg, "x")
    assert "Qwen3" in str(e.value) and "Phi-3" in str(e.value) and repr(cfg.model_type) in str(e.value)


def test_a_plan_for_another_family_is_refused():
    from gqaprune.errors import GQAPruneError

    qwen, llama = make_family_model("qwen2"), make_family_model("llama")
    plan = plan_removing(model_layout(qwen), *CUTS["uniform"], "uniform")
    with pytest.raises(GQAPruneError, match="family: plan 'qwen2' vs model 'llama'"):
        apply_plan(llama, plan)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_dense_target_refit_is_refused_for_sandwich_norms(family, calib_ids):
    from gqaprune.errors import GQAPruneError
    from gqaprune.prune.compensate import compensate

    model = make_family_model(family)
    plan = plan_removing(model_layout(model), *CUTS["uniform"], "uniform")
    with pytest.raises(GQAPruneError, match="not defined for Gemma"):
        compensate(model, plan, calib_ids, target="dense", progress=False)
    rep = compensate(model, plan, calib_ids, target="layer", holdout=0.25, progress=False)   # the pre-norm target
    assert rep["summary"]["mlp"]["err_after"] <= rep["summary"]["mlp"]["err_before"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_evaluate_and_benchmark(saved, family, tmp_path):
    """gqaprune eval (perplexity, zero-shot) and bench on the saved per-layer checkpoint of each family."""
    from gqaprune.bench.command import BenchOptions, bench
    from gqaprune.evaluate.suite import EvalOptions, evaluate_model
    from helpers import write_text

    made, _ = saved
    folder = made[(family, "per-layer")][0]
    text = write_text(tmp_path / "t.txt")
    tasks = ["piqa"] if family in ("gemma2", "phi3") else []   # lm-eval's harness once on a fused and a sandwich family
    res = evaluate_model(EvalOptions(model=folder, ppl=[str(text)], seq_len=32, tasks=tasks, limit=4, device="cpu",
                                     dtype="fp32"))
    one = res.to_dict()["results"][0]
    assert one["ppl"][0]["n_tokens"] > 0 and 1 < one["ppl"][0]["ppl"] < 1e6
    zs = one["tasks"]["tasks"] if tasks else {}   # a ZeroShotResult.to_dict(): per-task accuracies under "tasks"
    assert set(zs) == set(tasks) and all(0 <= r["acc"] <= 1 for r in zs.values())
    b = bench(BenchOptions(models=[made[(family, "uniform")][0], folder], prompt_len=16, new_tokens=4,
                           batch_sizes=[1], repeats=1, warmup=1, device="cpu", dtype="fp32"))
    rows = b.rows
    assert len(rows) == 2 and all(r.decode_tok_s > 0 and r.prefill_tok_s > 0 for r in rows)
    assert rows[1].flops_ratio_prefill > 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_query_heads_not_a_multiple_of_kv_heads_are_refused(family, tmp_path, capsys):
    """4 query heads over 3 KV heads cannot be grouped: refused, with exit 2, before any weight is read."""
    import transformers

    from gqaprune.cli import main
    from helpers import FAMILY_BASE, write_text

    cls_name, kw = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, cls_name)(**{**FAMILY_BASE, **kw, "num_attention_heads": 4, "num_key_value_heads": 3})
    folder = tmp_path / "odd"
    folder.mkdir()
    cfg.save_pretrained(folder)          # a config only: the check must come before the weights are looked for
    rc = main(["prune", "--model", str(folder), "--pruning-ratio", "0.2", "--output", str(tmp_path / "out"),
               "--calibration", str(write_text(tmp_path / "c.txt")), "--num-samples", "2", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a multiple of 3 key/value heads" in err, err
    assert not (tmp_path / "out").exists()
