"""--distill_from: the distillation loss (alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM loss), its
edge cases, the teacher run per micro-batch without gradients, and the vocabulary check."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model, make_tokenizer
from helpers import read_metrics, save_dense, write_records
from gqaprune.errors import GQAPruneError
from gqaprune.data.collate import PadCollator, pack_examples
from gqaprune.recover.distill import distillation_kl
from gqaprune.recover.finetune import FinetuneOptions, finetune




def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i, n in enumerate((11, 7, 16)):
        x = torch.randint(3, 320, (n,), generator=g).tolist()
        feats.append({"input_ids": x, "labels": [-100] * 3 + x[3:], "idx": i, "train": True})
    return feats


def _trainer(tmp_path, student, teacher=None, alpha=0.5, temperature=2.0):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from gqaprune.recover.trainer import LoRATrainer

    torch.manual_seed(0)
    model = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM"))
    with torch.no_grad():  # a LoRA that is not a no-op, so the student differs from its base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none",
                             per_device_train_batch_size=3, remove_unused_columns=False)
    tr = LoRATrainer(model=model, args=args, data_collator=PadCollator(0), teacher=teacher, distill_alpha=alpha,
                     distill_temperature=temperature)
    return tr, model.train()


def _manual_kd(student_logits, teacher_logits, labels, T):
    keep = labels[..., 1:] != -100
    s = torch.log_softmax(student_logits[..., :-1, :].float() / T, -1)[keep]
    t = torch.log_softmax(teacher_logits[..., :-1, :].float() / T, -1)[keep]
    return (t.exp() * (t - s)).sum(), int(keep.sum())


def test_distillation_kl_counts_loss_tokens_only():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 50), torch.randn(2, 6, 50)
    labels = torch.randint(0, 50, (2, 6))
    labels[0, :3] = -100
    labels[1, 4:] = -100
    kl, n = distillation_kl(s, t, labels, 2.0)
    ref, n_ref = _manual_kd(s, t, labels, 2.0)
    assert n == n_ref == 3 + 3 and kl.item() == pytest.approx(ref.item(), rel=1e-5)
    assert distillation_kl(s, s.clone(), labels, 2.0)[0].item() == 0.0
    # changing logits at a position whose next label is -100 changes nothing
    s2 = s.clone()
    s2[0, 0] += 5.0
    assert distillation_kl(s2, t, labels, 2.0)[0].item() == pytest.approx(kl.item(), rel=1e-6)
    with pytest.raises(GQAPruneError, match="share one vocabulary"):
        distillation_kl(s, t[..., :40], labels, 2.0)


@pytest.mark.parametrize("pack", [False, True])
def test_alpha_zero_equals_plain_loss_exactly(tmp_path, pack):
    """alpha = 0: the loss is bit-for-bit the plain LM loss (same batch, same model), teacher or not."""
    batch = PadCollator(0, pack=pack)(_batch())
    n_items = (batch["labels"][..., 1:] != -100).sum()
    plain_tr, model = _trainer(tmp_path, make_tiny_model(0))
    plain = plain_tr.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    tr, _ = _trainer(tmp_path, make_tiny_model(0), teacher=make_tiny_model(1).eval(), alpha=0.0)
    tr.model = model
    kd = tr.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    assert kd.item() == plain.item() and kd.requires_grad
    assert tr._distill_sums[0] > 0         # the teacher did run and disagrees: only alpha silenced it
    # without num_items_in_batch (no Trainer token count) too
    assert tr.compute_loss(model, dict(batch)).item() == plain_tr.compute_loss(model, dict(batch)).item()


def test_alpha_one_with_teacher_equal_to_student_is_zero(tmp_path):
    student = make_tiny_model(0)
    tr, model = _trainer(tmp_path, student, alpha=1.0)
    # teacher == the student as it is now (LoRA included): merge a copy
    import copy

    teacher = copy.deepcopy(model).merge_and_unload().eval()
    tr.teacher = teacher
    batch = PadCollator(0)(_batch())
    loss = tr.compute_loss(model, dict(batch), num_items_in_batch=(batch["labels"][..., 1:] != -100).sum())
    assert abs(loss.item()) < 1e-6


def test_mixed_loss_is_the_stated_formula(tmp_path):
    """loss = (1 - a) * CE + a * T^2 * KL / tokens, KL(teacher || student) at temperature T."""
    a, T = 0.3, 3.0
    batch = PadCollator(0)(_batch())
    n_items = (batch["labels"][..., 1:] != -100).sum()
    teacher = make_tiny_model(1).eval()
    with torch.no_grad():  # a confident teacher, so the KL term is large enough to be checked
        teacher.lm_head.weight.mul_(40)
    tr, model = _trainer(tmp_path, make_tiny_model(0), teacher=teacher, alpha=a, temperature=T)
    loss = tr.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    with torch.no_grad():
        out = model(**batch)
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd_sum, n = _manual_kd(out.logits, t_logits, batch["labels"], T)
    expect = (1 - a) * out.loss + a * T * T * kd_sum / n
    assert a * T * T * kd_sum / n > 0.1
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    # the KL direction matters: KL(student || teacher) would give another number
    keep = batch["labels"][..., 1:] != -100
    s = torch.log_softmax(out.logits[..., :-1, :] / T, -1)[keep]
    t = torch.log_softmax(t_logits[..., :-1, :] / T, -1)[keep]
    reverse = (1 - a) * out.loss + a * T * T * (s.exp() * (s - t)).sum() / n
    assert abs(reverse.item() - loss.item()) > 1e-2


def test_teacher_runs_per_micro_batch_without_grad(tmp_path):
    """End to end: teacher frozen, called once per micro-batch with grad disabled; metrics carry the KL and
    LM-loss terms; the val loss stays the plain LM loss; teacher == student with alpha = 1 starts at loss 0."""
    base = save_dense(tmp_path / "dense")
    data = write_records(tmp_path / "data.jsonl")
    calls = []

    import gqaprune.recover.finetune as ft

    real_load = ft.load_teacher

    def spy_load(*a, **kw):
        t = real_load(*a, **kw)
        t.register_forward_hook(lambda m, args, kwargs, out: calls.append(
            (torch.is_grad_enabled(), kwargs["input_ids"].shape[0], out.logits.requires_grad,
             any(p.requires_grad for p in m.parameters()), m.training)), with_kwargs=True)
        return t

    ft.load_teacher = spy_load
    try:
        o = FinetuneOptions(prune_model=str(base), data_path=str(data), output_dir=str(tmp_path / "kd"),
                            batch_size=4, micro_batch_size=2, val_set_size=8, max_steps=2, eval_steps=0,
                            save_steps=100, logging_steps=1, cutoff_len=192, learning_rate=1e-3, warmup_steps=0,
                            seed=0, distill_from=str(base), distill_alpha=1.0, distill_temperature=2.0)
        res = finetune(o)
    finally:
        ft.load_teacher = real_load
    assert len(calls) == 2 * 2           # 2 steps x 2 micro-batches; none during evaluation
    assert all(c == (False, 2, False, False, False) for c in calls), calls
    recs = read_metrics(tmp_path / "kd")
    first = next(r for r in recs if r["step"] == 1 and "train/loss" in r)
    assert abs(first["train/loss"]) < 1e-6 and abs(first["train/distill_kl"]) < 1e-6   # LoRA B = 0: same model
    assert first["train/lm_loss"] > 1.0
    evals = [r["eval/loss"] for r in recs if "eval/loss" in r]
    assert len(evals) == 2 and all(e > 1.0 for e in evals)      # plain LM loss, not the KD loss
    assert res.distill["teacher"] == str(base) and res.distill["alpha"] == 1.0
    assert any("distillation from" in ln for ln in res.lines())


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    base = save_dense(tmp_path / "dense")
    other = tmp_path / "other"
    m = make_tiny_model(1)
    tok = make_tokenizer()
    tok.add_tokens(["<extra_token>"])
    m.save_pretrained(other)
    tok.save_pretrained(other)
    data = write_records(tmp_path / "data.jsonl")
    kw = dict(prune_model=str(base), data_path=str(data), batch_size=2, micro_batch_size=2, val_set_size=0,
              max_steps=1, cutoff_len=192)
    with pytest.raises(GQAPruneError, match="--distill_from .*tokenizer differs"):
        finetune(FinetuneOptions(output_dir=str(tmp_path / "a"), distill_from=str(other), **kw))
    assert not (tmp_path / "a").exists()
    with pytest.raises(GQAPruneError, match="--distill_from"):
        finetune(FinetuneOptions(output_dir=str(tmp_path / "b"), distill_from=str(tmp_path / "nope"), **kw))
    with pytest.raises(GQAPruneError, match="--distill_alpha 1.5"):
        finetune(FinetuneOptions(output_dir=str(tmp_path / "c"), distill_from=str(base), distill_alpha=1.5, **kw))
    with pytest.raises(GQAPruneError, match="--distill_temperature 0"):
        finetune(FinetuneOptions(output_dir=str(tmp_path / "d"), distill_from=str(base), distill_temperature=0,
                                 **kw))


def test_packed_teacher_sees_block_diagonal_attention():
    """With --packing the teacher gets position_ids too: its logits on a packed row equal each example alone."""
    teacher = make_tiny_model(1).eval()
    feats = _batch()
    packed = pack_examples([f["input_ids"] for f in feats], [f["labels"] for f in feats])
    with torch.no_grad():
        got = teacher(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        off = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = teacher(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(got[off:off + n], alone, atol=1e-5, rtol=1e-5)
            off += n
