"""gqaprune.recover.finetune: tokenisation, LoRA on per-layer shapes, logging sinks, cache reuse, resume, NaN stop,
the seed guide's command line, and every bad input the issue lists."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import finetune_options, kill_at_step, make_tokenizer
from helpers import read_metrics, save_dense, save_per_layer, train_losses, write_records, write_text
from gqaprune.errors import GQAPruneError
from gqaprune.data.tokenized import prepare_data, prompt_template_tokens, tokenize_records
from gqaprune.outputs import MANIFEST
from gqaprune.recover.finetune import TrainingDivergedError, finetune
from gqaprune.recover.options import grad_accumulation

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def per_layer_dir(tmp_path):
    return save_per_layer(tmp_path / "per_layer")


@pytest.fixture
def records_path(tmp_path):
    return write_records(tmp_path / "data.jsonl")


def _opts(tmp_path, base, data, **kw):
    return finetune_options(tmp_path, base, data, **kw)


# ------------------------------------------------------------------------------ tokenisation


def test_tokenize_masks_prompt_and_respects_cutoff_and_eos():
    from gqaprune.data.instructions import alpaca_prompt

    tok = make_tokenizer()
    recs = [{"instruction": "the quick fox", "input": "", "output": "lazy dog"},
            {"instruction": "the quick fox", "input": "grouped query", "output": "one key head"}]
    split, dropped = tokenize_records(recs, [0, 1], tok, cutoff_len=512, train_on_inputs=False, add_eos_token=True)
    assert dropped == 0 and len(split) == 2
    for i, rec in enumerate(recs):
        ex = split[i]
        plen = len(tok(alpaca_prompt(rec["instruction"], rec["input"]))["input_ids"])
        full = tok(alpaca_prompt(rec["instruction"], rec["input"]) + rec["output"])["input_ids"]
        assert list(ex["input_ids"]) == full + [tok.eos_token_id]
        assert all(t == -100 for t in ex["labels"][:plen])                     # prompt masked
        assert list(ex["labels"][plen:]) == full[plen:] + [tok.eos_token_id]  # response + EOS trained
        assert ex["idx"] == i
    # the with-input template differs from the no-input one
    assert len(split[1]["input_ids"]) > len(split[0]["input_ids"])
    # train_on_inputs: nothing masked; no EOS unless asked
    split2, _ = tokenize_records(recs, [0], tok, cutoff_len=512, train_on_inputs=True, add_eos_token=False)
    assert -100 not in list(split2[0]["labels"]) and split2[0]["input_ids"][-1] != tok.eos_token_id
    # cutoff truncates; an example whose prompt fills the cutoff is dropped
    assert prompt_template_tokens(tok) < len(tok(alpaca_prompt("the quick fox"))["input_ids"])
    cutoff = len(tok(alpaca_prompt("the quick fox"))["input_ids"]) + 2
    cut, dropped = tokenize_records(recs, [0, 1], tok, cutoff_len=cutoff, train_on_inputs=False,
                                    add_eos_token=True)
    assert len(cut[0]["input_ids"]) == cutoff and cut[0]["input_ids"][-1] != tok.eos_token_id  # cut, no EOS
    assert dropped == 1 and len(cut) == 1   # the with-input prompt alone is longer than the cutoff


def test_val_split_is_fixed_by_seed(records_path, tmp_path):
    from gqaprune.data.instructions import load_instruction_records

    tok = make_tokenizer()
    recs = load_instruction_records(str(records_path))
    o = _opts(tmp_path, "x", records_path, val_set_size=8, max_train_samples=20)
    a = prepare_data(o, tok, recs)
    b = prepare_data(o, tok, recs)
    c = prepare_data(_opts(tmp_path, "x", records_path, val_set_size=8, max_train_samples=20, seed=1), tok, recs)
    assert a[1].record_idx.tolist() == b[1].record_idx.tolist() != c[1].record_idx.tolist()
    assert len(a[0]) <= 20 and not set(a[0].record_idx.tolist()) & set(a[1].record_idx.tolist())


def test_grad_accumulation():
    assert grad_accumulation(128, 4, 1) == 32
    assert grad_accumulation(128, 4, 4) == 8
    with pytest.raises(GQAPruneError, match="multiple of --micro_batch_size 4 x 3 process"):
        grad_accumulation(128, 4, 3)


# ------------------------------------------------------------------------- training runs


def test_lora_on_per_layer_model_logs_everywhere(tmp_path, per_layer_dir, records_path, monkeypatch):
    """Per-layer widths [1,2] KV groups and [48,128] MLP channels: LoRA trains with no patching;
    metrics.jsonl, W&B offline run, TensorBoard events, PNG, summary and adapter are written."""
    val_txt = write_text(tmp_path / "val.txt")
    o = _opts(tmp_path, per_layer_dir, records_path, wandb_project="gqaprune-test", tensorboard=True,
              extra_val_dataset=[str(val_txt)], extra_val_max_tokens=384, cache_dataset=True, max_steps=3,
              eval_steps=2)
    res = finetune(o)
    out = Path(o.output_dir)
    assert res.status == "completed" and res.global_step == 3 and res.grad_accum == 2
    assert res.dataset_cache == "miss" and res.tokens_per_second > 0 and res.train_tokens > 0
    assert 0 < res.train_seconds < res.wall_seconds
    # adapter shapes follow each layer's own widths (layer 0: 1 KV group -> k_proj out 8; MLP 48)
    w = load_file(out / "adapter_model.safetensors")
    key = lambda layer, mod: next(k for k in w if f"layers.{layer}." in k and mod in k and "lora_B" in k)  # noqa: E731
    assert w[key(0, "k_proj")].shape[0] == 8 and w[key(1, "k_proj")].shape[0] == 16
    assert w[key(0, "q_proj")].shape[0] == 32 and w[key(1, "q_proj")].shape[0] == 64
    assert w[key(0, "up_proj")].shape[0] == 48 and w[key(1, "up_proj")].shape[0] == 128
    assert any(float(v.abs().max()) > 0 for k, v in w.items() if "lora_B" in k)   # it trained
    # metrics: names as the issue gives them, PPL with its protocol, step 0 = before
    recs = read_metrics(out)
    keys = set().union(*recs)
    assert {"train/loss", "eval/loss", "eval/val_ppl", "learning_rate"} <= keys
    ppl_recs = [r for r in recs if "eval/val_ppl" in r]
    assert [r["step"] for r in ppl_recs] == [0, 2, 3]
    proto = ppl_recs[0]["eval/val_ppl_protocol"]
    assert proto["seq_len"] == 128 and proto["stride"] == 128 and proto["n_tokens"] == 381
    assert all(math.isfinite(r["train/loss"]) for r in recs if "train/loss" in r)
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["ppl_before"]["val"]["ppl"] == pytest.approx(ppl_recs[0]["eval/val_ppl"])
    assert summary["ppl_after"]["val"]["ppl"] == pytest.approx(ppl_recs[-1]["eval/val_ppl"])
    assert summary["best_eval_loss"] == pytest.approx(min(r["eval/loss"] for r in recs if "eval/loss" in r))
    png = out / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "W&B offline run not written"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "finetune" and manifest["options"]["lora_r"] == 8 and (out / "checkpoint-2").is_dir()
    from gqaprune.outputs import foreign_entries

    assert foreign_entries(out) == []     # the manifest claims everything the run wrote
    assert any("per-layer" in s or "LoRA" in s for s in res.lines())

    # Second run on the same data and settings: the tokenised cache is reused, nothing re-tokenised.
    import gqaprune.data.tokenized as tokenized

    def boom(*a, **k):
        raise AssertionError("re-tokenised despite --cache_dataset")

    monkeypatch.setattr(tokenized, "tokenize_records", boom)
    res2 = finetune(_opts(tmp_path, per_layer_dir, records_path, cache_dataset=True, max_steps=1,
                          output_dir=str(tmp_path / "out2")))
    assert res2.dataset_cache == "hit" and res2.train_examples == res.train_examples
    # a changed tokenisation setting is a different cache entry
    with pytest.raises(AssertionError, match="re-tokenised"):
        finetune(_opts(tmp_path, per_layer_dir, records_path, cache_dataset=True, max_steps=1, cutoff_len=160,
                       output_dir=str(tmp_path / "out3")))


def test_resume_continues_same_steps_and_data_order(tmp_path, records_path):
    """Stop a run after checkpoint-4 (an exception at step 5), resume with 'last': steps 5-6 reproduce
    the uninterrupted run's losses and record order exactly."""
    base = save_dense(tmp_path / "dense")
    common = dict(batch_size=2, micro_batch_size=2, max_steps=6, save_steps=2, eval_steps=0, val_set_size=0,
                  lora_dropout=0.1, log_sample_ids=True)
    ref = finetune(_opts(tmp_path, base, records_path, output_dir=str(tmp_path / "ref"), **common))
    assert ref.global_step == 6
    ref_losses = train_losses(tmp_path / "ref")
    ref_samples = (tmp_path / "ref" / "samples_rank0.txt").read_text().splitlines()

    run = tmp_path / "run"
    o = _opts(tmp_path, base, records_path, output_dir=str(run), **common)
    with pytest.raises(KeyboardInterrupt):
        finetune(o, callbacks=[kill_at_step(5)])
    assert (run / "checkpoint-4").is_dir() and not (run / "checkpoint-6").exists()
    # not resuming into a folder that holds this run is refused
    with pytest.raises(GQAPruneError, match="resume_from_checkpoint last"):
        finetune(o)
    n_before = len((run / "samples_rank0.txt").read_text().splitlines())
    res = finetune(_opts(tmp_path, base, records_path, output_dir=str(run), resume_from_checkpoint="last",
                         **common))
    assert res.global_step == 6 and res.resumed_from.endswith("checkpoint-4")
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]        # step 5's old line was dropped, not duplicated
    for s in (5, 6):
        assert losses[s] == pytest.approx(ref_losses[s], rel=1e-5, abs=1e-6), (s, losses, ref_losses)
    # the curves' x axis counts from the run's start across the resume, as the uninterrupted run's does;
    # the summary's train_tokens (the throughput's numerator) is this invocation's steps 5-6 only
    def tokens(folder):
        return {r["step"]: r["train/tokens_seen"] for r in read_metrics(folder) if "train/tokens_seen" in r}
    assert tokens(run)[6] == tokens(tmp_path / "ref")[6] > tokens(run)[4] > 0
    assert res.train_tokens == tokens(run)[6] - tokens(run)[4]
    new = (run / "samples_rank0.txt").read_text().splitlines()[n_before:]
    assert new[:2] == ref_samples[4:6]
    a = load_file(run / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes_the_same_run(tmp_path, records_path, capsys):
    """The first SIGINT saves a checkpoint at the end of the current optimizer step (not only at
    --save_steps) and stops; the CLI says where and exits 130; 'last' resumes from there and ends
    where the uninterrupted run does."""
    import os
    import signal

    from gqaprune.cli import main
    from gqaprune.errors import Interrupted

    base = save_dense(tmp_path / "dense")
    common = dict(batch_size=2, micro_batch_size=2, max_steps=6, save_steps=100, eval_steps=0, val_set_size=0)
    ref = finetune(_opts(tmp_path, base, records_path, output_dir=str(tmp_path / "ref"), **common))

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:  # arrives during step 3
                os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as ei:
        finetune(_opts(tmp_path, base, records_path, output_dir=str(run), **common), callbacks=[CtrlC()])
    assert signal.getsignal(signal.SIGINT) is handler  # the default Ctrl-C behaviour is back
    assert ei.value.checkpoint.endswith("checkpoint-3") and (run / "checkpoint-3").is_dir()
    assert not (run / "finetune_summary.json").exists()   # not mistaken for a finished run (gqaprune run)
    assert "step 3" in str(ei.value)
    res = finetune(_opts(tmp_path, base, records_path, output_dir=str(run), resume_from_checkpoint="last",
                         **common))
    assert res.global_step == ref.global_step == 6 and res.resumed_from.endswith("checkpoint-3")
    a = load_file(run / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # through the CLI: the message names the checkpoint and how to continue; exit code 130
    out2 = tmp_path / "cli"
    import gqaprune.recover.finetune as ft

    real = ft.finetune
    ft_calls = []

    def with_ctrl_c(o, **kw):
        ft_calls.append(o)
        return real(o, callbacks=[CtrlC()])

    mp = pytest.MonkeyPatch()
    mp.setattr(ft, "finetune", with_ctrl_c)
    try:
        rc = main(["finetune", "--prune_model", str(base), "--data_path", str(records_path), "--output_dir",
                   str(out2), "--batch_size", "2", "--micro_batch_size", "2", "--max_steps", "6", "--save_steps",
                   "100", "--eval_steps", "0", "--val_set_size", "0", "--cache_dir", str(tmp_path / "cache")])
    finally:
        mp.undo()
    err = capsys.readouterr().err
    assert ft_calls and rc == 130, err
    assert "checkpoint-3" in err and "--resume_from_checkpoint last" in err


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, records_path):
    base = save_dense(tmp_path / "dense")

    class InjectNaN(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2 and not getattr(self, "done", False):
                head = next(m for n, m in model.named_modules() if n.endswith("lm_head"))
                head.register_forward_hook(lambda mod, inp, out: out * float("nan") if mod.training else out)
                self.done = True

    o = _opts(tmp_path, base, records_path, max_steps=5, save_steps=2, eval_steps=0, val_set_size=0)
    with pytest.raises(TrainingDivergedError, match="optimizer step 3") as ei:
        finetune(o, callbacks=[InjectNaN()])
    assert ei.value.step == 3 and ei.value.last_checkpoint.endswith("checkpoint-2")
    out = Path(o.output_dir)
    ck = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in ck.values())
    assert not (out / "checkpoint-4").exists() and not (out / "adapter_model.safetensors").exists()
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["status"] == "diverged" and "step 3" in summary["message"]


def test_guide_command_line_runs_with_paths_changed(tmp_path, data_env, monkeypatch):
    """The guide's post_training.py line, paths changed, small step budget, offline data, W&B offline."""
    import importlib.util

    base = save_per_layer(tmp_path / "pruned")
    spec = importlib.util.spec_from_file_location("post_training", REPO / "scripts" / "post_training.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "finetuned_llama3_gqa_aware_v3"
    cmd = f"""--prune_model {base} \\
        --data_path yahma/alpaca-cleaned \\
        --output_dir {out} \\
        --wandb_project llama3-gqa-aware-finetune-v3 \\
        --num_epochs 2 --learning_rate 5e-5 --batch_size 128 --micro_batch_size 4 \\
        --lora_r 8 --lora_alpha 16 \\
        --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj \\
        --extra_val_dataset wikitext2 --cache_dataset"""
    budget = "--max_steps 1 --max_train_samples 48 --val_set_size 8 --extra_val_max_tokens 2048 --cutoff_len 128"
    argv = shlex.split(cmd.replace("\\\n", " ")) + budget.split()
    assert script.main(argv) == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["grad_accum"] == 32 and summary["global_step"] == 1
    assert summary["ppl_after"]["wikitext2"]["dataset"] == "wikitext2"
    assert summary["ppl_after"]["wikitext2"]["split"] == "test"
    assert list((out / "wandb").glob("offline-run-*"))
    assert any("eval/wikitext2_ppl" in r for r in read_metrics(out))
    # the second identical command refuses to clobber the finished run (exit 2)
    assert script.main(argv) == 2


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, per_layer_dir, records_path):
    """Checkpointing (default on GPU) with frozen base weights + LoRA: same losses as without it."""
    kw = dict(max_steps=2, val_set_size=0, lora_dropout=0.0)
    a = finetune(_opts(tmp_path, per_layer_dir, records_path, output_dir=str(tmp_path / "gc_on"),
                       gradient_checkpointing=True, **kw))
    b = finetune(_opts(tmp_path, per_layer_dir, records_path, output_dir=str(tmp_path / "gc_off"),
                       gradient_checkpointing=False, **kw))
    assert a.gradient_checkpointing and not b.gradient_checkpointing
    la, lb = train_losses(tmp_path / "gc_on"), train_losses(tmp_path / "gc_off")
    assert la.keys() == lb.keys() == {1, 2}
    assert all(la[k] == pytest.approx(lb[k], rel=1e-5) for k in la)
    wa = load_file(tmp_path / "gc_on" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "gc_off" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, match", [
    (dict(prune_model="no/such/pruned_model/pytorch_model.bin"), "prune_model"),
    (dict(batch_size=10, micro_batch_size=4), "multiple of --micro_batch_size 4"),
    (dict(cutoff_len=20), "shorter than the prompt template"),
    (dict(val_set_size=48), "only 48 records"),
    (dict(lora_target_modules=["q_proj", "qkv_proj"]), "qkv_proj matches no Linear.*gate_proj"),
    (dict(extra_val_dataset=["wikitext3"]), "--extra_val_dataset wikitext3"),
    (dict(fp16=True, bf16=True), "choose one"),
    (dict(resume_from_checkpoint="last"), "nothing to resume"),
    (dict(fp16=True, device="cpu"), "needs a CUDA GPU"),
])
def test_bad_input_is_a_clear_error(tmp_path, per_layer_dir, records_path, change, match):
    # options are checked when they are built (each group's __post_init__), the rest when finetune starts
    with pytest.raises(GQAPruneError, match=match):
        finetune(_opts(tmp_path, per_layer_dir, records_path, **change))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_empty_data_is_an_error(tmp_path, per_layer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(GQAPruneError, match="empty"):
        finetune(_opts(tmp_path, per_layer_dir, empty))


def test_output_dir_with_other_run_is_refused(tmp_path, per_layer_dir, records_path):
    """A folder gqaprune did not write is refused; so is a run (here one an earlier version recorded in
    run_manifest.json) with other options; --overwrite replaces that run only once every file in the folder
    is the run's own."""
    from gqaprune.recover.run_dir import plan_run_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    o = _opts(tmp_path, per_layer_dir, records_path)
    with pytest.raises(GQAPruneError, match="holds no gqaprune run"):
        finetune(o)
    other = dict(json.loads(json.dumps(o.__dict__)), lora_r=4)
    (out / "run_manifest.json").write_text(json.dumps({"kind": "gqaprune-finetune", "options": other}))
    with pytest.raises(GQAPruneError, match=r"different run \(lora_r: 4 then, 8 now\)"):
        finetune(o)
    o.overwrite = True
    with pytest.raises(GQAPruneError, match="gqaprune did not write these: notes.txt"):
        finetune(o)
    assert (out / "notes.txt").read_text() == "mine" and (out / "run_manifest.json").is_file()
    (out / "notes.txt").unlink()
    assert plan_run_dir(o, None).decision == "overwrite"
    res = finetune(o)
    assert res.status == "completed" and not (out / "run_manifest.json").exists()
    assert json.loads((out / MANIFEST).read_text())["options"]["lora_r"] == 8


def test_legacy_pickle_needs_allow_pickle(tmp_path, records_path):
    from helpers import make_tiny_model

    pkl = tmp_path / "prune_log" / "pytorch_model.bin"
    pkl.parent.mkdir()
    torch.save({"model": make_tiny_model(), "tokenizer": make_tokenizer()}, pkl)
    with pytest.raises(GQAPruneError, match="allow-pickle"):
        finetune(_opts(tmp_path, pkl, records_path))
    res = finetune(_opts(tmp_path, pkl, records_path, allow_pickle=True, max_steps=1, val_set_size=0))
    assert res.status == "completed"


def test_tokens_per_second_counts_the_training_loop_only(tmp_path, per_layer_dir, records_path):
    """A slow evaluation (before and after training) does not shorten or lengthen the measured loop."""
    import time as _time

    class SlowEvalClock(TrainerCallback):
        wall = 0.0

        def on_evaluate(self, args, state, control, **kw):
            _time.sleep(2.0)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = _time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.wall = _time.perf_counter() - self.t0

    clock = SlowEvalClock()
    res = finetune(_opts(tmp_path, per_layer_dir, records_path, max_steps=2, eval_steps=0, save_steps=100),
                   callbacks=[clock])
    # train() holds the callbacks' window plus its own setup; the evaluations are outside both
    assert res.train_seconds >= clock.wall - 0.05, (res.train_seconds, clock.wall)
    assert res.wall_seconds >= res.train_seconds + 4.0     # both evaluations are in the wall time
    # train_seconds is rounded to the millisecond: on a sub-second loop that alone moves the ratio by ~0.1%
    assert res.tokens_per_second == pytest.approx(res.train_tokens / res.train_seconds,
                                                  rel=1e-3 + 0.0005 / res.train_seconds)


def test_full_finetune_trains_every_weight_and_saves_a_loadable_checkpoint(tmp_path, per_layer_dir, records_path):
    """--full_finetune on the per-layer model: no adapter, every weight may change, the model is saved in
    output_dir/model in the input's own format (per-layer, with the prune plan) and loads back to the same logits."""
    from gqaprune.models.io import load_model
    from gqaprune.outputs import foreign_entries

    o = _opts(tmp_path, per_layer_dir, records_path, full_finetune=True, max_steps=3, learning_rate=1e-3)
    res = finetune(o)
    out = Path(o.output_dir)
    assert res.status == "completed" and res.method == "full" and res.adapter_dir == ""
    assert res.checkpoint_dir == str(out / "model")
    assert not (out / "adapter_model.safetensors").exists()
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    before = load_file(Path(per_layer_dir) / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert set(before) == set(after) and all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # every projection type and the norms trained, not only a LoRA's targets
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "norm"):
        assert any(part in k for k in changed), part
    model, _ = load_model(str(out / "model"))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    ref, _ = load_model(str(per_layer_dir))
    with torch.no_grad():
        assert not torch.allclose(ref(ids).logits, logits)          # the saved weights are the trained ones
    assert foreign_entries(out) == []                                # the run folder claims model/
    assert any(s.startswith("Full fine-tuning completed") for s in res.lines())


def test_full_finetune_resumes_from_its_checkpoint(tmp_path, per_layer_dir, records_path):
    """A killed --full_finetune run (per-layer model) resumes from checkpoint-2 and ends with the same weights
    as the uninterrupted run."""
    common = dict(batch_size=2, micro_batch_size=2, max_steps=4, save_steps=2, eval_steps=0, val_set_size=0,
                  full_finetune=True)
    finetune(_opts(tmp_path, per_layer_dir, records_path, output_dir=str(tmp_path / "ref"), **common))

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(_opts(tmp_path, per_layer_dir, records_path, output_dir=str(run), **common), callbacks=[kill_at_step(3)])
    assert (run / "checkpoint-2").is_dir() and not (run / "model").exists()
    res = finetune(_opts(tmp_path, per_layer_dir, records_path, output_dir=str(run), resume_from_checkpoint="last",
                         **common))
    assert res.global_step == 4 and res.resumed_from.endswith("checkpoint-2")
    a, b = load_file(run / "model" / "model.safetensors"), load_file(tmp_path / "ref" / "model" / "model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
