"""gqaprune finetune never loses a user's files: --overwrite replaces only a folder gqaprune wrote (its manifest
claims every entry), and --output_dir never is, contains or lies inside an input. Every refusal comes before the
model or the data are loaded, and leaves every file as it was."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest

from helpers import finetune_options, kill_at_step, save_dense, write_records
from gqaprune.errors import GQAPruneError
from gqaprune.outputs import MANIFEST, foreign_entries, read_manifest
from gqaprune.recover.finetune import FinetuneOptions, finetune


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model or the data are loaded: the checks must come first."""
    import gqaprune.recover.finetune as ft

    def boom(*a, **k):
        raise AssertionError("loaded an input before the output folder was checked")

    monkeypatch.setattr(ft, "load_model", boom)
    monkeypatch.setattr(ft, "load_instruction_records", boom)


@pytest.fixture
def base(tmp_path):
    return save_dense(tmp_path / "dense")


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "data.jsonl")


def _opts(tmp_path, base, data, **kw):
    return finetune_options(tmp_path, base, data, **{"batch_size": 2, "val_set_size": 0, "eval_steps": 0, **kw})


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256): equal snapshots = nothing changed."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ --overwrite of foreign folders
def test_overwrite_refuses_a_folder_gqaprune_did_not_write(tmp_path, base, data, no_loading, capsys):
    """(1) The user's README.md, tokenizer.json and other files, no manifest: exit 2 naming them, nothing touched."""
    from gqaprune.cli import main

    out = tmp_path / "mine"
    (out / "checkpoint-7").mkdir(parents=True)
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json", "notes.txt", "checkpoint-7/x.txt"):
        (out / name).write_text(f"the user's {name}")
    (out / "wandb").mkdir()
    (out / "wandb" / "keep.txt").write_text("mine too")
    before = _snapshot(out)
    rc = main(["finetune", "--prune_model", str(base), "--data_path", str(data), "--output_dir", str(out),
               "--overwrite", "--batch_size", "2", "--micro_batch_size", "2", "--max_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    for name in ("README.md", "tokenizer.json", "notes.txt", "checkpoint-7", "wandb"):
        assert name in err
    assert _snapshot(out) == before
    # resuming (from a checkpoint elsewhere) into it is refused the same way
    ckpt = tmp_path / "elsewhere" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    with pytest.raises(GQAPruneError, match="README.md"):
        finetune(_opts(tmp_path, base, data, output_dir=str(out), resume_from_checkpoint=str(ckpt), overwrite=True))
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------ outputs overlapping inputs
@pytest.mark.parametrize("where", ["is", "inside", "contains"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_overlapping_the_pruned_model_is_refused(tmp_path, data, where, overwrite, no_loading):
    """(2) equal to the --prune_model folder, (3) inside it, (4) containing it: refused, the model unchanged.

    The model folder is one gqaprune wrote (save_checkpoint's manifest), so only the overlap check stops
    --overwrite from replacing it."""
    from helpers import save_per_layer

    parent = tmp_path / "models"
    model = save_per_layer(parent / "pruned")
    (parent / "other.txt").write_text("a user's file beside the model")
    out = {"is": model, "inside": model / "lora", "contains": parent}[where]
    before = _snapshot(parent)
    how = {"is": "is", "inside": "lies inside", "contains": "contains"}[where]
    with pytest.raises(GQAPruneError, match=f"{how} the input --prune_model"):
        finetune(_opts(tmp_path, model, data, output_dir=str(out), overwrite=overwrite))
    assert _snapshot(parent) == before and not (model / "lora").exists()


def test_output_dir_overlapping_other_inputs_is_refused(tmp_path, base, data, no_loading):
    """--data_path, --distill_from and a --resume_from_checkpoint outside the output folder are inputs too."""
    folder = tmp_path / "holder"
    folder.mkdir()
    inner = write_records(folder / "data.jsonl")
    before = _snapshot(folder)
    with pytest.raises(GQAPruneError, match="contains the input --data_path"):
        finetune(_opts(tmp_path, base, inner, output_dir=str(folder), overwrite=True))
    with pytest.raises(GQAPruneError, match="is the input --distill_from"):
        finetune(_opts(tmp_path, tmp_path / "student", data, output_dir=str(base), distill_from=str(base),
                       overwrite=True))
    # a checkpoint inside output_dir is the normal resume; an output_dir inside another run's checkpoint is not
    ckpt = folder / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    before = _snapshot(folder)
    with pytest.raises(GQAPruneError, match="lies inside the input --resume_from_checkpoint"):
        finetune(_opts(tmp_path, base, data, output_dir=str(ckpt / "lora"), resume_from_checkpoint=str(ckpt)))
    assert _snapshot(folder) == before and not (ckpt / "lora").exists()


# ------------------------------------------------------------------------------ gqaprune's own runs
def test_overwrite_replaces_an_earlier_run_even_an_interrupted_one(tmp_path, base, data):
    """(5) An earlier gqaprune finetune run, complete or killed mid-run, is recognised by its manifest (which
    claims every entry it wrote, checkpoints and all) and --overwrite replaces it."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        finetune(_opts(tmp_path, base, data, max_steps=4, log_sample_ids=True), callbacks=[kill_at_step(3)])
    assert (out / "checkpoint-2").is_dir()
    m = read_manifest(out)
    assert m["kind"] == "finetune" and "checkpoint-2" in m["entries"] and foreign_entries(out) == []
    res = finetune(_opts(tmp_path, base, data, max_steps=1, overwrite=True, tensorboard=True, lora_r=4))
    assert res.status == "completed" and not (out / "checkpoint-2").exists() and (out / "checkpoint-1").is_dir()
    assert not (out / "samples_rank0.txt").exists()   # the earlier run's files are gone
    assert foreign_entries(out) == [] and read_manifest(out)["options"]["lora_r"] == 4
    # and that finished run can be replaced again
    res = finetune(_opts(tmp_path, base, data, max_steps=1, overwrite=True))
    assert res.status == "completed" and foreign_entries(out) == []


def test_overwrite_refuses_a_run_folder_holding_a_users_file(tmp_path, base, data):
    """(6) A gqaprune run folder into which the user put a file: --overwrite is refused naming it; nothing changes."""
    out = tmp_path / "out"
    finetune(_opts(tmp_path, base, data, max_steps=1))
    (out / "my_notes.md").write_text("results I wrote down")
    before = _snapshot(out)
    with pytest.raises(GQAPruneError, match="gqaprune did not write these: my_notes.md"):
        finetune(_opts(tmp_path, base, data, max_steps=1, overwrite=True))
    assert _snapshot(out) == before


def test_resume_of_a_run_written_by_an_earlier_version(tmp_path, base, data):
    """A run folder with only the legacy run_manifest.json resumes; afterwards gqaprune's manifest claims it all."""
    from gqaprune.recover.run_dir import LEGACY_MANIFEST, manifest_options

    out = tmp_path / "out"
    o = _opts(tmp_path, base, data, max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        finetune(o, callbacks=[kill_at_step(3)])
    (out / MANIFEST).unlink()   # as an earlier version left it
    (out / LEGACY_MANIFEST).write_text(json.dumps({"kind": "gqaprune-finetune", "options": manifest_options(o)}))
    res = finetune(_opts(tmp_path, base, data, max_steps=4, resume_from_checkpoint="last"))
    assert res.status == "completed" and res.global_step == 4 and res.resumed_from.endswith("checkpoint-2")
    assert foreign_entries(out) == [] and LEGACY_MANIFEST in read_manifest(out)["entries"]


# ------------------------------------------------------------------------------ process-wide state
def test_wandb_offline_mode_is_not_set_for_the_process(tmp_path, monkeypatch):
    """Without a key, W&B logs offline for this run only: mode passed to wandb.init, os.environ untouched."""
    import os

    from gqaprune.recover.metrics import init_wandb

    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                         finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.netrc with a W&B key
    o = FinetuneOptions(prune_model="x", output_dir=str(tmp_path / "o"), wandb_project="p")
    assert init_wandb(o, tmp_path) is not None
    assert calls[-1]["mode"] == "offline" and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "disabled")   # the user's choice is left to wandb
    init_wandb(o, tmp_path)
    assert calls[-1]["mode"] is None and os.environ["WANDB_MODE"] == "disabled"
