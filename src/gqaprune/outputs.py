"""What gqaprune may write, replace or delete (docs/architecture.md, "Outputs").

The one home of these rules; every command that writes goes through this module:

1. **Nothing that gqaprune did not write is deleted or overwritten.** Every folder it
   writes carries ``MANIFEST`` (``gqaprune_manifest.json``) listing the entries it wrote.
   ``--overwrite`` replaces a folder only when that manifest is there and lists every
   entry in the folder (recursively through owned sub-folders that have their own
   manifest); otherwise it refuses (exit 2) and names the foreign files.
2. **An output never is, contains, or lies inside an input** (model, adapter, data,
   teacher): checked before any work starts.
3. **No half-written output looks complete.** A folder is written into a hidden sibling
   ``.NAME.tmp-XXXXXXXX`` and renamed into place when complete; a replaced folder is moved
   to ``.NAME.old-XXXXXXXX`` first and removed after the rename. Files go through a
   temporary name and ``os.replace`` likewise.
4. **Leftovers of a killed write are cleaned up** by the next write to the same output:
   the temporary siblings carry a manifest marker, and only marked ones are removed.

Folders that grow while a command runs (a fine-tuning run's ``output_dir``, the root of
``gqaprune run``) are ``RunFolder`` objects: their manifest is rewritten each time an
entry is added, so ownership holds even after an interruption.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)

MANIFEST = "gqaprune_manifest.json"
TOOL = "gqaprune"


# ------------------------------------------------------------------------------ manifest
def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none (or an unreadable one: then it is not ours)."""
    p = Path(folder) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == TOOL else None


def _manifest(kind: str, entries: Iterable[str], info: Mapping | None, complete: bool) -> str:
    from gqaprune import __version__

    m = {"tool": TOOL, "version": __version__, "kind": kind, "complete": complete,
         "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "entries": sorted(set(entries) - {MANIFEST})}
    if info:
        m.update({k: v for k, v in info.items() if k not in m})
    return json.dumps(m, indent=2, default=str)


def foreign_entries(folder: Path) -> list[str]:
    """Paths (relative to ``folder``) that gqaprune's manifests do not claim; [] for an owned folder."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        return sorted(p.name for p in folder.iterdir())
    owned = set(m.get("entries", [])) | {MANIFEST}
    out = []
    for p in sorted(folder.iterdir()):
        if p.name not in owned and not _is_atomic_leftover(p.name, owned):
            out.append(p.name)
        elif p.is_dir() and not p.is_symlink() and read_manifest(p) is not None:
            out += [f"{p.name}/{x}" for x in foreign_entries(p)]
    return out


def _is_atomic_leftover(name: str, owned: set[str]) -> bool:
    """``.NAME.tmp-XXXXXXXX``: what a killed ``atomic_write`` of an owned entry NAME leaves beside it."""
    if not name.startswith(".") or ".tmp-" not in name:
        return False
    base, _, suffix = name[1:].rpartition(".tmp-")
    return base in owned and len(suffix) == 8 and all(c in "0123456789abcdef" for c in suffix)


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------ checks
def _resolved(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(out: Path, flag: str, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of ``inputs`` (flag -> local path)."""
    o = _resolved(out)
    for in_flag, p in inputs.items():
        if p is None or not Path(p).expanduser().exists():
            continue   # a Hub id or alias resolved elsewhere: nothing local to protect here
        i = _resolved(p)
        if _inside(o, i) or _inside(i, o):
            how = "is" if o == i else ("lies inside" if _inside(o, i) else "contains")
            raise GQAPruneError(f"{flag} {out}: {how} the input {in_flag} {p}; writing there could destroy the input. "
                                "Choose an output folder outside the inputs.")


def check_writable(out: Path, flag: str) -> None:
    """Fail now, not after the work, when the output's location cannot be written."""
    p = _resolved(out)
    anc = p if p.is_dir() else p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise GQAPruneError(f"{flag} {out}: {anc} is a file, not a folder; choose another output path")
    probe = anc / f".gqaprune-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise GQAPruneError(f"{flag} {out}: cannot write in {anc} ({e.strerror or e}); choose a writable "
                            "location") from e


def check_output(out: str | Path, *, flag: str, overwrite: bool,
                 inputs: Mapping[str, str | Path | None] | None = None) -> bool:
    """Check an output folder before any work; True when it exists and will be replaced.

    Refuses (GQAPruneError, exit 2): an output that overlaps an input; an existing non-empty
    folder without ``overwrite``; with ``overwrite``, a folder holding anything gqaprune's
    manifest does not claim (the foreign entries are named); a location that cannot be written.
    """
    out = Path(out).expanduser()
    if not _check_location(out, flag, inputs):
        return False
    if not overwrite:
        raise GQAPruneError(f"{flag} {out}: the folder exists; choose another folder or pass --overwrite")
    check_replaceable(out, flag)
    return True


def _check_location(out: Path, flag: str, inputs: Mapping[str, str | Path | None] | None) -> bool:
    """Refuse an output that overlaps an input, is a file, or cannot be written; True when it holds entries."""
    check_not_input(out, flag, inputs or {})
    if out.exists() and not out.is_dir():
        raise GQAPruneError(f"{flag} {out}: exists and is a file, not a folder; choose another path")
    check_writable(out, flag)
    return out.is_dir() and any(out.iterdir())


def check_replaceable(out: Path, flag: str) -> None:
    """Refuse to replace a folder that holds files gqaprune did not write."""
    foreign = foreign_entries(out)
    if foreign:
        why = (f"it has no {MANIFEST}, so gqaprune did not write it" if read_manifest(out) is None
               else "gqaprune did not write these")
        raise GQAPruneError(f"{flag} {out}: --overwrite only replaces a folder gqaprune wrote, and {why}: "
                            f"{_describe(foreign)}. Move them away, or choose another folder.")


# ------------------------------------------------------------------------------ leftovers
def _siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def clean_stale(out: Path) -> list[str]:
    """Remove the temporary folders an interrupted write of ``out`` left behind (only marked ones).

    Returns what was removed; unmarked look-alikes are left and logged.
    """
    removed = []
    for p in _siblings(Path(out).expanduser()):
        if p.is_dir() and read_manifest(p) is not None:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
            log.warning("removed %s, left by an interrupted write of %s", p, out)
        elif p.exists():
            log.warning("%s looks like a leftover of an interrupted write, but carries no gqaprune marker; "
                        "left in place (remove it yourself if you do not need it)", p)
    return removed


def stale_files(out: Path) -> list[Path]:
    """Temporary files a killed single-file write of ``out`` left (``.NAME.tmp-*``), to name in a message."""
    out = Path(out).expanduser()
    return [p for p in out.parent.glob(f".{out.name}.tmp-*") if p.is_file()]


# ------------------------------------------------------------------------------ writing
def _is_write_failure(e: BaseException) -> bool:
    """OSError, or safetensors' own error for a failed write (it reports I/O errors as SafetensorError)."""
    if isinstance(e, OSError):
        return True
    return type(e).__name__ == "SafetensorError" and "I/O error" in str(e)


def write_folder(out: str | Path, kind: str, fill: Callable[[Path], object], *, overwrite: bool = False,
                 flag: str = "--output", info: Mapping | None = None) -> Path:
    """Write a complete folder atomically: ``fill(tmp)`` writes the files, then it is renamed into place.

    The manifest (kind, version, time, every entry ``fill`` wrote, and ``info``) is written
    last, so the folder's ownership is exactly what was written. An existing ``out`` is
    replaced only with ``overwrite`` and only when gqaprune owns all of it (checked again here,
    right before the swap).
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise GQAPruneError(f"{flag} {out}: exists and is a file, not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise GQAPruneError(f"{flag} {out}: the folder exists; choose another folder or pass --overwrite")
        check_replaceable(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        # the marker first: a killed write leaves a folder the next write recognises as its own leftover
        (tmp / MANIFEST).write_text(_manifest(kind, [], info, complete=False))
        fill(tmp)
        (tmp / MANIFEST).write_text(_manifest(kind, (p.name for p in tmp.iterdir()), info, complete=True))
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(trash, out)   # put the earlier folder back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001 - filtered: only failures to write become messages
        if not _is_write_failure(e):
            raise
        # a full disk, a quota, a location that became read-only: the input at fault is the location
        why = getattr(e, "strerror", None) or str(e)
        raise GQAPruneError(f"{flag} {out}: writing failed ({why}); the partial copy was removed and "
                            f"{'the earlier folder is unchanged' if out.exists() else 'nothing was left there'}. "
                            "Free some space or choose another location.") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write one file through a temporary name in the same folder, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class RunFolder:
    """A folder that grows while a command runs; its manifest is rewritten whenever an entry is added.

    ``open`` checks it once: a new or empty folder is taken; an existing one is reused only
    when gqaprune wrote all of it (``reuse=True``: resuming) or replaced with ``overwrite``
    (its owned entries are removed first; foreign entries make it refuse).
    """

    def __init__(self, path: Path, kind: str, info: Mapping | None = None):
        self.path, self.kind, self.info = path, kind, dict(info or {})
        m = read_manifest(path)
        self.entries: set[str] = set(m.get("entries", [])) if m else set()

    @classmethod
    def prepare(cls, path: str | Path, kind: str, *, flag: str, overwrite: bool, reuse: bool,
                inputs: Mapping[str, str | Path | None] | None = None) -> str:
        """Check ``path`` before any work (nothing is changed): 'new', 'reuse' or 'replace'."""
        path = Path(path).expanduser()
        if not _check_location(path, flag, inputs):
            return "new"
        if reuse and not overwrite:
            check_replaceable(path, flag)   # resuming writes into it: it must be ours
            return "reuse"
        if not overwrite:
            raise GQAPruneError(f"{flag} {path}: the folder exists; choose another folder or pass --overwrite")
        check_replaceable(path, flag)
        return "replace"

    @classmethod
    def open(cls, path: str | Path, kind: str, decision: str, info: Mapping | None = None) -> RunFolder:
        """Create or clear the folder as ``prepare`` decided, and write its manifest."""
        path = Path(path).expanduser()
        if decision == "replace":
            for e in path.iterdir():
                shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
        path.mkdir(parents=True, exist_ok=True)
        rf = cls(path, kind, info)
        rf._write()
        return rf

    def add(self, *names: str) -> None:
        """Claim entries (top-level names) this command has written or is about to write."""
        new = set(names) - self.entries
        if new:
            self.entries |= new
            self._write()

    def sync(self) -> None:
        """Claim what is in the folder now (call only where gqaprune alone has written since ``open``)."""
        self.add(*(p.name for p in self.path.iterdir()))

    def _write(self) -> None:
        atomic_write(self.path / MANIFEST, _manifest(self.kind, self.entries, self.info, complete=True))
