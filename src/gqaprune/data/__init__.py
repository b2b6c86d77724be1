"""Text corpora and instruction data, by their usual Hub names or from local files.

Well-known names resolve to the Hub (``wikitext``/``wikitext-2-raw-v1``, ``ptb_text_only``,
``allenai/c4``, ``yahma/alpaca-cleaned``). When ``GQAPRUNE_DATA_DIR`` names a folder laid
out like the project's ``shared/data`` (``wikitext-2-raw/wiki.test.raw``,
``alpaca-cleaned/alpaca_data_cleaned.jsonl.gz``, ``zeroshot/*.jsonl``), the same names
resolve to the local files first, so the same command lines work offline. A local
file path always works.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "GQAPRUNE_DATA_DIR"

# name -> split -> path relative to GQAPRUNE_DATA_DIR
LOCAL_CORPORA = {
    "wikitext2": {"test": "wikitext-2-raw/wiki.test.raw", "train": "wikitext-2-raw/wiki.train.raw",
                  "validation": "wikitext-2-raw/wiki.valid.raw"},
    "ptb": {"test": "ptb/ptb.test.txt", "train": "ptb/ptb.train.txt", "validation": "ptb/ptb.valid.txt"},
    "c4": {"validation": "c4/c4-validation.00000-of-00008.json.gz", "train": "c4/c4-train.00000-of-01024.json.gz"},
}
CORPUS_ALIASES = {"wikitext2": "wikitext2", "wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2-raw": "wikitext2",
                  "ptb": "ptb", "c4": "c4"}
ALPACA_IDS = ("yahma/alpaca-cleaned", "alpaca-cleaned", "alpaca")
ALPACA_LOCAL = "alpaca-cleaned/alpaca_data_cleaned.jsonl.gz"

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class CorpusText:
    """One split of a text corpus, joined the way the Hub rows are joined for perplexity."""

    text: str
    dataset: str     # canonical name (wikitext2, ptb, c4) or the file name
    split: str
    source: str      # local path or hub id the text came from


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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")


def _hub_dataset(path: str, name: str | None, split: str, what: str, **kw):
    if _offline():
        raise GQAPruneError(
            f"{what}: the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and no local copy was found; "
            f"set {DATA_DIR_ENV} to a folder laid out like shared/data, or pass a local file path."
        )
    try:
        import datasets

        return datasets.load_dataset(path, name, split=split, **kw)
    except Exception as e:  # noqa: BLE001 - network, missing dataset, auth...
        raise GQAPruneError(
            f"{what}: could not load {path}{'/' + name if name else ''} ({split}) from the Hub: {type(e).__name__}: "
            f"{str(e)[:300]}. Offline? Set {DATA_DIR_ENV} to a folder laid out like shared/data, or pass a local file."
        ) from e


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_records(path: Path) -> list[dict]:
    """Records from a .json (list or {'data': [...]}) or .jsonl file, optionally gzipped."""
    name = path.name.removesuffix(".gz")
    try:
        with _open_text(path) as fh:
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


def _records_to_text(records: list[dict], path: Path) -> str:
    if not records:
        return ""
    first = records[0]
    if "instruction" in first:
        return "\n\n".join(alpaca_prompt(r.get("instruction", ""), r.get("input", "")) + str(r.get("output", ""))
                           for r in records)
    for key in ("text", "sentence", "content"):
        if key in first:
            return "\n\n".join(str(r.get(key, "")) for r in records)
    raise GQAPruneError(f"{path}: records have no 'text', 'sentence', 'content' or 'instruction' field")


def load_text_corpus(name: str, split: str = "test") -> CorpusText:
    """A corpus split as one string: ``wikitext2``, ``ptb``, ``c4`` or a local text/JSON file."""
    p = Path(name).expanduser()
    if p.is_file():
        if p.name.removesuffix(".gz").endswith((".json", ".jsonl")):
            text = _records_to_text(read_records(p), p)
        else:
            with _open_text(p) as fh:
                text = fh.read()
        return CorpusText(text, p.name, "file", str(p))
    key = CORPUS_ALIASES.get(name.lower())
    if key is None:
        raise GQAPruneError(
            f"dataset {name!r}: not a known corpus (wikitext2, ptb, c4) and no such file; pass one of those names "
            "or a path to a .txt/.json/.jsonl(.gz) file."
        )
    rel = LOCAL_CORPORA[key].get(split)
    local = local_data_file(rel) if rel else None
    if local is not None:
        if key == "c4":
            text = "\n\n".join(r["text"] for r in read_records(local))
        else:
            text = local.read_text(encoding="utf-8")
        return CorpusText(text, key, split, str(local))
    what = f"dataset {name} ({split})"
    if key == "wikitext2":
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split, what)
        # The raw rows already end in "\n": joining with "" reproduces wiki.{split}.raw byte for byte.
        return CorpusText("".join(ds["text"]), key, split, "hub:wikitext/wikitext-2-raw-v1")
    if key == "ptb":
        ds = _hub_dataset("ptb_text_only", "penn_treebank", split, what)
        return CorpusText(" ".join(ds["sentence"]), key, split, "hub:ptb_text_only/penn_treebank")
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz", "train": "en/c4-train.00000-of-01024.json.gz"}
    if split not in files:
        raise GQAPruneError(f"dataset c4: split {split!r} not available; use validation or train")
    ds = _hub_dataset("allenai/c4", None, "train", what, data_files={"train": files[split]})
    return CorpusText("\n\n".join(ds["text"]), key, split, f"hub:allenai/c4/{files[split]}")


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the dataset's field name
    """The Alpaca template up to and including ``### Response:\\n``."""
    if input and input.strip():
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


def resolve_instruction_source(name_or_path: str) -> str:
    """Where instruction data will come from: a local path, or ``hub:<id>``."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return str(p)
    if name_or_path.lower() in ALPACA_IDS:
        local = local_data_file(ALPACA_LOCAL)
        if local is not None:
            return str(local)
    if p.suffix in (".json", ".jsonl", ".gz") or name_or_path.startswith((".", "/", "~")):
        raise GQAPruneError(f"--data_path {name_or_path}: no such file")
    return "hub:" + name_or_path


def load_instruction_records(name_or_path: str) -> list[dict]:
    """Instruction records (instruction/input/output) from a Hub id or a local .json/.jsonl(.gz)."""
    src = resolve_instruction_source(name_or_path)
    if src.startswith("hub:"):
        ds = _hub_dataset(src[4:], None, "train", f"--data_path {name_or_path}")
        records = [dict(r) for r in ds]
    else:
        records = read_records(Path(src))
    if not records:
        raise GQAPruneError(f"--data_path {name_or_path}: the data is empty")
    if "instruction" not in records[0] or "output" not in records[0]:
        raise GQAPruneError(
            f"--data_path {name_or_path}: records need 'instruction' and 'output' fields (Alpaca format); "
            f"found {sorted(records[0])}"
        )
    log.info("loaded %d instruction records from %s", len(records), src)
    return records


CALIBRATION_FORMATS = ("prompt", "text")


def record_text(r: dict, fmt: str = "prompt") -> str:
    """One instruction record as calibration text: ``prompt`` = the Alpaca template + response (what
    fine-tuning and the chat use); ``text`` = instruction, input and output as plain lines, no template."""
    if fmt == "text":
        return "\n".join(t for t in (str(r.get(k) or "").strip() for k in ("instruction", "input", "output")) if t)
    return alpaca_prompt(r.get("instruction", ""), r.get("input", "")) + str(r.get("output", ""))


def calibration_texts(source: str, seed: int, max_chars: int, fmt: str = "prompt") -> tuple[list[str], str]:
    """Texts to draw calibration tokens from, shuffled by ``seed``; returns (texts, description).

    ``alpaca`` (default): Alpaca records formatted with the template (prompt + response), or with
    ``fmt="text"`` as plain text (instruction, input, output; no template).
    ``wikitext2`` / ``c4`` / ``ptb``: the corpus' train split (c4: validation shard), in paragraphs.
    Any local file: its records or paragraphs.
    """
    if fmt not in CALIBRATION_FORMATS:
        raise GQAPruneError(f"--calibration-format {fmt}: choose one of {', '.join(CALIBRATION_FORMATS)}")
    rng = random.Random(seed)
    p = Path(source).expanduser()
    if source.lower() in ALPACA_IDS or (p.is_file() and p.name.removesuffix(".gz").endswith((".json", ".jsonl"))
                                         and _looks_instruction(p)):
        records = load_instruction_records(source)
        rng.shuffle(records)
        texts, n = [], 0
        for r in records:
            t = record_text(r, fmt)
            texts.append(t)
            n += len(t)
            if n >= max_chars:
                break
        what = "alpaca-format records" if fmt == "prompt" else "instruction records as plain text (no template)"
        return texts, f"{what} from {resolve_instruction_source(source)} (seed {seed})"
    split = "validation" if source.lower() == "c4" else ("file" if p.is_file() else "train")
    corpus = load_text_corpus(source, split if split != "file" else "test")
    paras = [t for t in corpus.text.split("\n\n") if t.strip()]
    rng.shuffle(paras)
    out, n = [], 0
    for t in paras:
        out.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return out, f"{corpus.dataset} {corpus.split} paragraphs from {corpus.source} (seed {seed})"


def _looks_instruction(path: Path) -> bool:
    try:
        recs = read_records(path)
    except GQAPruneError:
        return False
    return bool(recs) and isinstance(recs[0], dict) and "instruction" in recs[0]
