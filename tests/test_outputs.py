"""What gqaprune may write, replace or delete (gqaprune.outputs): nothing it did not write is ever lost."""

from __future__ import annotations

import json

import pytest

from gqaprune.errors import GQAPruneError
from gqaprune.outputs import MANIFEST, RunFolder, check_output, clean_stale, foreign_entries, read_manifest, \
    write_folder


def _fill(files: dict):
    def fill(tmp):
        for name, text in files.items():
            (tmp / name).write_text(text)
    return fill


def test_write_folder_claims_what_it_wrote_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "out"
    write_folder(out, "test", _fill({"a.txt": "1", "b.txt": "2"}))
    m = read_manifest(out)
    assert m["kind"] == "test" and m["entries"] == ["a.txt", "b.txt"] and m["complete"] is True
    assert foreign_entries(out) == []
    with pytest.raises(GQAPruneError, match="exists"):
        write_folder(out, "test", _fill({"c.txt": "3"}))
    write_folder(out, "test", _fill({"c.txt": "3"}), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "c.txt"])
    # a file the user put there is never deleted: --overwrite refuses and names it
    (out / "notes.md").write_text("mine")
    with pytest.raises(GQAPruneError, match="notes.md"):
        write_folder(out, "test", _fill({"d.txt": "4"}), overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "c.txt").is_file()


def test_overwrite_refuses_a_folder_without_manifest_naming_its_files(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "README.md").write_text("user's")
    with pytest.raises(GQAPruneError) as e:
        check_output(out, flag="--output", overwrite=True)
    assert "config.json" in str(e.value) and "README.md" in str(e.value) and MANIFEST in str(e.value)
    assert (out / "README.md").read_text() == "user's"
    # an unreadable or foreign manifest is not ours either
    (out / MANIFEST).write_text(json.dumps({"tool": "someone-else", "entries": ["config.json", "README.md"]}))
    with pytest.raises(GQAPruneError, match="README.md"):
        check_output(out, flag="--output", overwrite=True)


def test_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, how in ((model, "is the input"), (model / "sub", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(GQAPruneError, match=how):
            check_output(out, flag="--output", overwrite=True, inputs={"--model": model})
    data = tmp_path / "d" / "calib.txt"
    data.parent.mkdir()
    data.write_text("x")
    with pytest.raises(GQAPruneError, match="contains the input --calibration"):
        check_output(data.parent, flag="--output", overwrite=True, inputs={"--calibration": data})
    # a Hub id or a name that is not a local path protects nothing and refuses nothing
    assert check_output(tmp_path / "new", flag="--output", overwrite=False, inputs={"--model": "org/name"}) is False


def test_stale_temporary_folders_of_an_interrupted_write_are_cleaned(tmp_path):
    out = tmp_path / "ckpt"
    ours = tmp_path / ".ckpt.tmp-deadbeef"        # what a kill -9 during write_folder leaves
    ours.mkdir()
    (ours / MANIFEST).write_text(json.dumps({"tool": "gqaprune", "complete": False, "entries": []}))
    (ours / "model.safetensors").write_bytes(b"\0" * 100)
    lookalike = tmp_path / ".ckpt.tmp-notours1"   # not marked: left alone
    lookalike.mkdir()
    (lookalike / "x").write_text("keep")
    assert clean_stale(out) == [str(ours)]
    assert not ours.exists() and (lookalike / "x").read_text() == "keep"
    write_folder(out, "test", _fill({"a": "1"}))
    assert [p.name for p in tmp_path.glob(".ckpt.tmp-*")] == [".ckpt.tmp-notours1"]  # only the look-alike


def test_a_failed_fill_leaves_no_folder_that_looks_complete(tmp_path):
    out = tmp_path / "out"

    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder(out, "test", boom)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_killed_atomic_write_of_an_owned_file_is_not_foreign(tmp_path):
    out = tmp_path / "out"
    write_folder(out, "test", _fill({"summary.json": "{}"}))
    (out / ".summary.json.tmp-0123abcd").write_text("half")   # kill -9 inside atomic_write
    (out / ".other.tmp-0123abcd").write_text("?")             # not the leftover of an owned file
    assert foreign_entries(out) == [".other.tmp-0123abcd"]


def test_run_folder_claims_entries_as_they_appear(tmp_path):
    root = tmp_path / "run"
    assert RunFolder.prepare(root, "run", flag="--output-root", overwrite=False, reuse=True) == "new"
    rf = RunFolder.open(root, "run", "new")
    (root / "step1").mkdir()
    rf.add("step1")
    assert foreign_entries(root) == []
    assert RunFolder.prepare(root, "run", flag="--output-root", overwrite=False, reuse=True) == "reuse"
    (root / "mine.txt").write_text("user")
    for overwrite in (False, True):
        with pytest.raises(GQAPruneError, match="mine.txt"):
            RunFolder.prepare(root, "run", flag="--output-root", overwrite=overwrite, reuse=True)
    (root / "mine.txt").unlink()
    assert RunFolder.prepare(root, "run", flag="--output-root", overwrite=True, reuse=False) == "replace"
    RunFolder.open(root, "run", "replace")
    assert [p.name for p in root.iterdir()] == [MANIFEST]


def test_unwritable_location_fails_before_any_work(tmp_path, monkeypatch):
    import gqaprune.outputs as o

    def no(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(o.Path, "mkdir", no)
    with pytest.raises(GQAPruneError, match="cannot write"):
        check_output(tmp_path / "x" / "y", flag="--output", overwrite=False)
