"""Fault injection: kill -9 during a save, a read-only output location, a full disk.

Every test checks that no file the user had is changed and that no folder that looks complete is
left behind. Where this machine lets the tests mount a tmpfs (root in the sandbox), the read-only
and full-disk cases also run on a real one; otherwise on the patched equivalent only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import uuid

import pytest

from helpers import patch_load_model, prune_args, save_per_layer, write_records
from gqaprune.cli import main


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def _looks_complete(folder) -> list[str]:
    """Visible folders under ``folder`` that hold a config.json (what a user or a loader takes for a checkpoint);
    gqaprune's own marked temporaries are hidden (``.NAME.tmp-*``)."""
    return [str(p.parent) for p in pathlib.Path(folder).rglob("config.json")
            if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder, or pytest.skip when this machine does not allow mounting."""
    mounted = []

    def mount(options: str):
        d = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the patched variant covers it")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


# ----------------------------------------------------------------------------- kill -9 during save
def test_kill_9_during_save_leaves_nothing_that_looks_complete_and_the_next_run_cleans_up(tiny_dir, tmp_path,
                                                                                          calib_file):
    user = tmp_path / "user_notes.txt"
    user.write_text("keep me")
    before = _snapshot(tiny_dir)
    out = tmp_path / "out"
    args = prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2")
    code = ("import sys, time\nimport gqaprune.models.io as io, gqaprune.outputs as o\n"
            "orig = o.write_folder\n"
            "def slow(out, kind, fill, **kw):\n"
            "    def f(tmp):\n        fill(tmp); print('READY', flush=True); time.sleep(120)\n"
            "    return orig(out, kind, f, **kw)\n"
            "io.write_folder = slow\nfrom gqaprune.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "READY" in proc.stdout.readline(), proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists() and _looks_complete(tmp_path) == [str(tiny_dir)]
    stale = list(tmp_path.glob(".out.tmp-*"))
    assert len(stale) == 1 and (stale[0] / "gqaprune_manifest.json").is_file()   # marked as gqaprune's leftover
    assert main(args) == 0                                                        # the next write cleans it up
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "config.json").is_file()
    assert user.read_text() == "keep me" and _snapshot(tiny_dir) == before


# ----------------------------------------------------------------------------- read-only location
def _commands(tmp_path, tiny_dir, calib_file, dest):
    """Every command that writes, pointed at ``dest``."""
    base = save_per_layer(tmp_path / "base")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (lora / "adapter_model.safetensors").write_bytes(b"")
    data = write_records(tmp_path / "data.jsonl")
    return {
        "prune": prune_args(tiny_dir, dest / "p", calib_file, "--pruning-ratio", "0.2"),
        "finetune": ["finetune", "--prune-model", str(base), "--data-path", str(data), "--output-dir",
                     str(dest / "f"), "--batch-size", "2", "--micro-batch-size", "2"],
        "merge": ["merge", "--pruned-model", str(base), "--lora-dir", str(lora), "--output-dir", str(dest / "m")],
        "eval": ["eval", "--model", str(tiny_dir), "--ppl", str(calib_file), "--output", str(dest / "e")],
        "run": ["run", "--model", str(tiny_dir), "--output-root", str(dest / "r"), "--profile", "quick",
                "--tasks", "piqa"],
    }


def _read_only_checks(tmp_path, tiny_dir, calib_file, dest, capsys, monkeypatch):
    import gqaprune.models.io as io

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the read-only output was reported")

    patch_load_model(monkeypatch, no_load)
    assert io.load_model is no_load
    for name, args in _commands(tmp_path, tiny_dir, calib_file, dest).items():
        snap = _snapshot(tmp_path)
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert "cannot write" in err and "Traceback" not in err, (name, err)
        assert _snapshot(tmp_path) == snap, name     # nothing the user had changed, nothing was added


def test_read_only_output_fails_before_any_work_patched(tiny_dir, tmp_path, calib_file, capsys, monkeypatch):
    dest = tmp_path / "readonly"
    dest.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if dest in self.parents or self == dest:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    _read_only_checks(tmp_path, tiny_dir, calib_file, dest, capsys, monkeypatch)


def test_read_only_output_fails_before_any_work_real_tmpfs(tiny_dir, tmp_path, calib_file, capsys, monkeypatch,
                                                          mount_tmpfs):
    dest = mount_tmpfs("ro,size=1m")
    _read_only_checks(tmp_path, tiny_dir, calib_file, dest, capsys, monkeypatch)


# ----------------------------------------------------------------------------- full disk
def _full_disk_check(tiny_dir, tmp_path, calib_file, dest, capsys):
    mine = dest / "mine.txt"
    mine.write_text("x")
    out = dest / "ckpt"
    rc = main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2"))
    err = capsys.readouterr().err
    assert rc == 2 and "writing failed" in err and "No space left" in err and "Traceback" not in err, err
    assert not out.exists() and not list(dest.glob(".ckpt.*")), list(dest.iterdir())   # no half checkpoint
    assert mine.read_text() == "x" and not _looks_complete(dest)


def test_full_disk_during_save_patched(tiny_dir, tmp_path, calib_file, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def full(self, folder, *a, **k):
        (pathlib.Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)   # a partial file, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    dest = tmp_path / "disk"
    dest.mkdir()
    _full_disk_check(tiny_dir, tmp_path, calib_file, dest, capsys)


def test_full_disk_during_save_real_tmpfs(tiny_dir, tmp_path, calib_file, capsys, mount_tmpfs):
    dest = mount_tmpfs("size=64k")   # the tiny checkpoint needs a few hundred KiB
    _full_disk_check(tiny_dir, tmp_path, calib_file, dest, capsys)


def test_an_earlier_folder_survives_a_failed_overwrite(tiny_dir, tmp_path, calib_file, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2")) == 0
    before = _snapshot(out)
    from transformers import PreTrainedModel

    def full(self, folder, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.3", "--overwrite")) == 2
    assert "earlier folder is unchanged" in capsys.readouterr().err
    assert _snapshot(out) == before and not list(tmp_path.glob(".ckpt.*"))
