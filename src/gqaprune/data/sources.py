"""Where data comes from: the local data folder (``GQAPRUNE_DATA_DIR``), the Hub, and file readers.

Well-known names resolve to the Hub (``wikitext``/``wikitext-2-raw-v1``, ``ptb_text_only``,
``allenai/c4``, ``yahma/alpaca-cleaned``). When ``GQAPRUNE_DATA_DIR`` names a folder laid
out like the project's ``shared/data`` (``wikitext-2-raw/wiki.test.raw``,
``alpaca-cleaned/alpaca_data_cleaned.jsonl.gz``, ``zeroshot/*.jsonl``), the same names
resolve to the local files first, so the same command lines work offline. A local
file path always works. This module is the one home of the ``GQAPRUNE_DATA_DIR`` lookup.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "GQAPRUNE_DATA_DIR"


def data_dir() -> Path | None:
    d = os.environ.get(DATA_DIR_ENV)
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        where = "" if p.is_absolute() else f" (relative to the current folder: {p.resolve()})"
        raise GQAPruneError(f"{DATA_DIR_ENV}={d}: not a folder{where}; point it at a folder laid out like "
                            "shared/data (an absolute path works from anywhere), or unset it to use the Hub")
    return p


def local_data_file(relpath: str) -> Path | None:
    d = data_dir()
    if d is None:
        return None
    p = d / relpath
    return p if p.is_file() else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")


def hub_dataset(path: str, name: str | None, split: str, what: str, **kw):
    if hub_offline():
        raise GQAPruneError(
            f"{what}: the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and no local copy was found; "
            f"set {DATA_DIR_ENV} to a folder laid out like shared/data, or pass a local file path."
        )
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, **kw)
    except (OSError, ValueError) as e:  # network, offline, missing dataset or config, auth (all OSError in hub 1.x+)
        raise GQAPruneError(
            f"{what}: could not load {path}{'/' + name if name else ''} ({split}) from the Hub: {type(e).__name__}: "
            f"{str(e)[:300]}. Offline? Set {DATA_DIR_ENV} to a folder laid out like shared/data, or pass a local file."
        ) from e


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_records(path: Path) -> list[dict]:
    """Records from a .json (list or {'data': [...]}) or .jsonl file, optionally gzipped."""
    name = path.name.removesuffix(".gz")
    try:
        with open_text(path) as fh:
            if name.endswith(".jsonl"):
                return [json.loads(line) for line in fh if line.strip()]
            obj = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GQAPruneError(f"{path}: could not read JSON records ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        obj = obj.get("data") or obj.get("train") or list(obj.values())
    if not isinstance(obj, list):
        raise GQAPruneError(f"{path}: expected a JSON list of records")
    return obj


