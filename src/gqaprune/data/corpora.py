"""Text corpora for perplexity and calibration: wikitext2, ptb, c4 (local copies first), or a local file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gqaprune.data.instructions import record_text
from gqaprune.data.sources import DATA_DIR_ENV, hub_dataset, hub_offline, local_data_file, open_text, read_records
from gqaprune.errors import GQAPruneError

# name -> split -> path relative to GQAPRUNE_DATA_DIR
LOCAL_CORPORA = {
    "wikitext2": {"test": "wikitext-2-raw/wiki.test.raw", "train": "wikitext-2-raw/wiki.train.raw",
                  "validation": "wikitext-2-raw/wiki.valid.raw"},
    "ptb": {"test": "ptb/ptb.test.txt", "train": "ptb/ptb.train.txt", "validation": "ptb/ptb.valid.txt"},
    "c4": {"validation": "c4/c4-validation.00000-of-00008.json.gz", "train": "c4/c4-train.00000-of-01024.json.gz"},
}
HELD_OUT = "alpaca-heldout"   # validation text: the held-out Alpaca-cleaned records (instructions.HELD_OUT_EVERY)
CORPUS_ALIASES = {HELD_OUT: HELD_OUT, "alpaca-val": HELD_OUT, "wikitext2": "wikitext2", "wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2-raw": "wikitext2",
                  "ptb": "ptb", "c4": "c4"}
@dataclass
class CorpusText:
    """One split of a text corpus, joined the way the Hub rows are joined for perplexity."""

    text: str
    dataset: str     # canonical name (wikitext2, ptb, c4) or the file name
    split: str
    source: str      # local path or hub id the text came from


def _records_to_text(records: list[dict], path: Path) -> str:
    if not records:
        return ""
    first = records[0]
    if "instruction" in first:
        return "\n\n".join(record_text(r) for r in records)
    for key in ("text", "sentence", "content"):
        if key in first:
            return "\n\n".join(str(r.get(key, "")) for r in records)
    raise GQAPruneError(f"{path}: records have no 'text', 'sentence', 'content' or 'instruction' field")


def corpus_key(name: str, flag: str = "dataset") -> str | None:
    """The canonical corpus name (wikitext2, ptb, c4), None for an existing local file; refuses anything else."""
    if Path(name).expanduser().is_file():
        return None
    key = CORPUS_ALIASES.get(name.lower())
    if key is None:
        raise GQAPruneError(
            f"{flag} {name}: not a known corpus ({', '.join(sorted([*LOCAL_CORPORA, HELD_OUT]))}) and no such file; "
            "pass one of "
            "those names or a path to a .txt/.json/.jsonl(.gz) file."
        )
    return key


def check_corpus(name: str, split: str = "test", flag: str = "dataset") -> None:
    """Fail now, before any model is loaded, when ``name`` cannot be read: unknown, or offline without a copy."""
    key = corpus_key(name, flag)
    if key is None:
        return
    if key == HELD_OUT:
        from gqaprune.data.calibration import check_source

        return check_source("alpaca", flag + " " + name)
    rel = LOCAL_CORPORA[key].get(split)
    if (rel is None or local_data_file(rel) is None) and hub_offline():
        raise GQAPruneError(f"{flag} {name}: no local copy of its {split} split and the Hub is offline "
                            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); set {DATA_DIR_ENV} to a folder laid out like "
                            "shared/data, or pass a local file path.")


def load_text_corpus(name: str, split: str = "test") -> CorpusText:
    """A corpus split as one string: ``wikitext2``, ``ptb``, ``c4`` or a local text/JSON file."""
    p = Path(name).expanduser()
    key = corpus_key(name)
    if key is None:
        if p.name.removesuffix(".gz").endswith((".json", ".jsonl")):
            text = _records_to_text(read_records(p), p)
        else:
            try:
                with open_text(p) as fh:
                    text = fh.read()
            except UnicodeDecodeError as e:
                raise GQAPruneError(f"{p}: not UTF-8 text ({e}); convert it (e.g. iconv -t utf-8) or pass another "
                                    "file") from e
        return CorpusText(text, p.name, "file", str(p))
    if key == HELD_OUT:   # one split whatever is asked: the held-out records, in the fine-tuning template
        from gqaprune.data.instructions import load_instruction_records, resolve_instruction_source

        return CorpusText("\n\n".join(record_text(r) for r in load_instruction_records("alpaca", "held_out")),
                          HELD_OUT, "held-out", resolve_instruction_source("alpaca"))
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
        ds = hub_dataset("wikitext", "wikitext-2-raw-v1", split, what)
        # The raw rows already end in "\n": joining with "" reproduces wiki.{split}.raw byte for byte.
        return CorpusText("".join(ds["text"]), key, split, "hub:wikitext/wikitext-2-raw-v1")
    if key == "ptb":
        ds = hub_dataset("ptb_text_only", "penn_treebank", split, what)
        return CorpusText(" ".join(ds["sentence"]), key, split, "hub:ptb_text_only/penn_treebank")
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz", "train": "en/c4-train.00000-of-01024.json.gz"}
    if split not in files:
        raise GQAPruneError(f"dataset c4: split {split!r} not available; use validation or train")
    ds = hub_dataset("allenai/c4", None, "train", what, data_files={"train": files[split]})
    return CorpusText("\n\n".join(ds["text"]), key, split, f"hub:allenai/c4/{files[split]}")


