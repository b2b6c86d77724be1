"""--packing (padding-free micro-batches) and --group_by_length: no cross-contamination between packed
examples, positions restart per example, and training gives the same losses as the padded baseline."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_model
from helpers import make_per_layer_model, read_metrics, save_per_layer, train_losses, write_records
from gqaprune.data.collate import PadCollator, pack_examples
from gqaprune.outputs import MANIFEST
from gqaprune.recover.finetune import FinetuneOptions, finetune




def _examples(seed: int = 0, lens=(9, 23, 5, 16)):
    """Token ids and labels; each example's first third is a masked 'prompt' (-100), as in Alpaca data."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for n in lens:
        x = torch.randint(3, 320, (n,), generator=g).tolist()
        p = n // 3
        ids.append(x)
        labels.append([-100] * p + x[p:])
    return ids, labels


def _per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL of labels[i + 1] under logits[i] (the causal-LM loss before reduction); NaN where not counted."""
    lp = torch.log_softmax(logits.float(), dim=-1)[:-1]
    tgt = labels[1:]
    keep = tgt != -100
    out = torch.full(tgt.shape, float("nan"))
    out[keep] = -lp[keep].gather(-1, tgt[keep, None])[:, 0]
    return out


def _model(kind: str, impl: str):
    m = make_tiny_model() if kind == "dense" else make_per_layer_model()
    m.set_attn_implementation(impl)
    return m.eval()


@pytest.mark.parametrize("kind", ["dense", "per-layer"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_per_sequence_loss_equals_each_sequence_alone(kind, impl):
    model = _model(kind, impl)
    ids, labels = _examples()
    batch = pack_examples(ids, labels)
    assert batch["input_ids"].shape == (1, sum(map(len, ids))) and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        off = 0
        for x, lab in zip(ids, labels):
            n = len(x)
            alone_logits = model(input_ids=torch.tensor([x]), use_cache=False).logits[0]
            alone_loss = model(input_ids=torch.tensor([x]), labels=torch.tensor([lab]), use_cache=False).loss
            seg_lab = batch["labels"][0, off:off + n]
            # the packed labels differ from the example's own only in the first (never-used) label
            assert seg_lab[0] == -100 and seg_lab[1:].tolist() == lab[1:]
            nll = _per_token_nll(packed[off:off + n], seg_lab)
            ref = _per_token_nll(alone_logits, torch.tensor(lab))
            keep = ~torch.isnan(ref)
            assert torch.equal(keep, ~torch.isnan(nll))
            torch.testing.assert_close(nll[keep], ref[keep], atol=1e-5, rtol=1e-5)
            assert nll[keep].mean().item() == pytest.approx(alone_loss.item(), abs=1e-5)
            off += n


def test_packing_without_position_reset_would_leak():
    """Negative control: the same packed row with running positions lets examples see each other."""
    model = _model("dense", "sdpa")
    ids, labels = _examples()
    batch = pack_examples(ids, labels)
    n0, n1 = len(ids[0]), len(ids[1])
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, n0:n0 + n1]
        alone = model(input_ids=torch.tensor([ids[1]]), use_cache=False).logits[0]
    assert (leaky - alone).abs().max() > 1e-2


def test_collator_pack_and_pad():
    ids, labels = _examples(lens=(4, 6, 3))
    feats = [{"input_ids": x, "labels": lab, "idx": i, "train": True} for i, (x, lab) in enumerate(zip(ids, labels))]
    packed = PadCollator(0, pack=True)(feats)
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert packed["input_ids"][0].tolist() == sum(ids, [])
    assert packed["labels"][0, [0, 4, 10]].tolist() == [-100, -100, -100]
    padded = PadCollator(0)(feats)
    assert padded["input_ids"].shape == (3, 8) and padded["attention_mask"].sum().item() == 13
    # the loss counts the same tokens either way (labels[..., 1:] != -100, as the Trainer counts them)
    assert (packed["labels"][..., 1:] != -100).sum() == (padded["labels"][..., 1:] != -100).sum()


def _opts(tmp_path, base, data, name, **kw):
    d = dict(prune_model=str(base), data_path=str(data), output_dir=str(tmp_path / name), batch_size=4,
             micro_batch_size=2, val_set_size=8, max_steps=3, eval_steps=0, save_steps=100, logging_steps=1,
             cutoff_len=192, learning_rate=1e-3, warmup_steps=0, lora_dropout=0.0, seed=0, log_sample_ids=True)
    d.update(kw)
    return FinetuneOptions(**d)


def test_packed_training_matches_padded_training(tmp_path):
    """Same examples, same order, same steps: per-step train losses, val loss and adapters agree; packed
    batches carry no padding; real-token counts agree."""
    from safetensors.torch import load_file

    base = save_per_layer(tmp_path / "pl")
    data = write_records(tmp_path / "data.jsonl")
    a = finetune(_opts(tmp_path, base, data, "padded"))
    b = finetune(_opts(tmp_path, base, data, "packed", packing=True))
    assert (a.batching, b.batching) == ("padded", "packed")
    assert a.padding_fraction > 0.05 and b.padding_fraction == 0.0
    assert a.train_tokens == b.train_tokens
    assert (tmp_path / "padded" / "samples_rank0.txt").read_text() == (tmp_path / "packed" / "samples_rank0.txt"
                                                                       ).read_text()
    la, lb = train_losses(tmp_path / "padded"), train_losses(tmp_path / "packed")
    assert la.keys() == lb.keys() == {1, 2, 3}
    for k in la:
        assert lb[k] == pytest.approx(la[k], rel=1e-5), (k, la, lb)
    assert b.best_eval_loss == pytest.approx(a.best_eval_loss, rel=1e-5)
    wa, wb = load_file(tmp_path / "padded" / "adapter_model.safetensors"), load_file(
        tmp_path / "packed" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert "packed" in "\n".join(b.lines())


def test_group_by_length_batches_similar_lengths(tmp_path):
    """Length-grouped batches: less padding than random batches over the same examples."""
    base = save_per_layer(tmp_path / "pl")
    data = write_records(tmp_path / "data.jsonl", n=64)
    kw = dict(max_steps=None, num_epochs=1, val_set_size=0, max_train_samples=40)
    r = finetune(_opts(tmp_path, base, data, "random", **kw))
    g = finetune(_opts(tmp_path, base, data, "grouped", group_by_length=True, **kw))
    both = finetune(_opts(tmp_path, base, data, "both", group_by_length=True, packing=True, **kw))
    assert g.batching == "length-grouped" and both.batching == "length-grouped + packed"
    assert r.global_step == g.global_step == both.global_step == 10
    seen = lambda name: sorted(int(i) for ln in (tmp_path / name / "samples_rank0.txt").read_text().split()  # noqa: E731
                               for i in ln.split(","))
    assert seen("random") == seen("grouped") == seen("both")          # same data, another order
    assert g.padding_fraction < r.padding_fraction and both.padding_fraction == 0.0
    assert r.train_tokens == g.train_tokens == both.train_tokens
    manifest = json.loads((tmp_path / "grouped" / MANIFEST).read_text())
    assert manifest["options"]["group_by_length"] is True
    assert all("train/loss" in rec for rec in read_metrics(tmp_path / "grouped") if rec["step"] in (1, 10)
               and "learning_rate" in rec)


def test_fused_kernels_detection(monkeypatch):
    import importlib.util

    from gqaprune.errors import GQAPruneError
    from gqaprune.recover.trainer import fused_kernel_plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real(n, *a))
    assert fused_kernel_plan(None, torch.device("cpu")) == (False, "none (liger-kernel is not installed)")
    assert fused_kernel_plan(False, torch.device("cpu"))[0] is False
    with pytest.raises(GQAPruneError, match="--fused_kernels: liger-kernel is not installed"):
        fused_kernel_plan(True, torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "liger_kernel" else real(n, *a))
    assert fused_kernel_plan(None, torch.device("cpu")) == (False, "none (Liger kernels need CUDA, training on cpu)")
    assert fused_kernel_plan(None, torch.device("cuda", 0)) == (True, "liger")



def test_val_loss_does_not_depend_on_training_batching(tmp_path):
    """The step-0 val loss (same model, same val examples) is identical with and without grouping/packing."""
    from helpers import read_metrics as rm

    base = save_per_layer(tmp_path / "pl")
    data = write_records(tmp_path / "data.jsonl", n=64)
    kw = dict(max_steps=1, val_set_size=24, micro_batch_size=4, batch_size=4)
    first = {}
    for name, extra in (("plain", {}), ("grouped", dict(group_by_length=True)),
                        ("both", dict(group_by_length=True, packing=True))):
        finetune(_opts(tmp_path, base, data, name, **kw, **extra))
        first[name] = next(r["eval/loss"] for r in rm(tmp_path / name) if r["step"] == 0 and "eval/loss" in r)
    assert first["plain"] == first["grouped"] == first["both"], first


@pytest.mark.parametrize("distil", [False, True])
def test_packed_loss_uses_only_loss_positions_and_matches_padded(tmp_path, distil):
    """The packed path projects only the loss positions onto the vocabulary, and its loss (plain or with
    distillation) equals the padded path's on the same examples."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from gqaprune.recover.trainer import LoRATrainer

    ids, labels = _examples()
    feats = [{"input_ids": x, "labels": lab, "idx": i, "train": True} for i, (x, lab) in enumerate(zip(ids, labels))]
    padded, packed = PadCollator(0)(feats), PadCollator(0, pack=True)(feats)
    n_items = (padded["labels"][..., 1:] != -100).sum()
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_model(0), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    teacher = None
    if distil:
        teacher = make_tiny_model(1).eval()
        with torch.no_grad():
            teacher.lm_head.weight.mul_(20)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    tr = LoRATrainer(model=model, args=args, data_collator=PadCollator(0), teacher=teacher, distill_alpha=0.5,
                     distill_temperature=2.0)
    model.train()
    lp, out = tr.compute_loss(model, dict(packed), return_outputs=True, num_items_in_batch=n_items)
    assert out.logits.shape[:2] == (1, int(n_items))        # only the loss positions were projected
    ld = tr.compute_loss(model, dict(padded), num_items_in_batch=n_items)
    assert lp.item() == pytest.approx(ld.item(), rel=1e-5, abs=1e-6)
    # gradients agree too
    lp.backward()
    gp = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    tr.compute_loss(model, dict(padded), num_items_in_batch=n_items).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(gp[n], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["sdpa", "flash_attention_2"])
def test_packed_rows_on_gpu_match_each_sequence_alone(impl):
    """On a GPU: the packed row (sdpa's masked kernel, or flash-attention's varlen path) gives each example
    the logits it has alone, in fp32 (sdpa) / bf16 (flash-attention)."""
    import importlib.util

    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    dtype = torch.bfloat16 if impl == "flash_attention_2" else torch.float32
    model = _model("per-layer", impl).to("cuda", dtype)
    ids, labels = _examples()
    batch = {k: v.cuda() for k, v in pack_examples(ids, labels).items()}
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        off = 0
        for x in ids:
            alone = model(input_ids=torch.tensor([x], device="cuda"), use_cache=False).logits[0]
            torch.testing.assert_close(packed[off:off + len(x)].float(), alone.float(), atol=tol, rtol=tol)
            off += len(x)
