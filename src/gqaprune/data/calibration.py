"""Calibration data: texts drawn from a source, tokenised into fixed-length windows."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from gqaprune.data.corpora import check_corpus, load_text_corpus
from gqaprune.data.instructions import (ALPACA_IDS, CALIBRATION_FORMATS, load_instruction_records, record_text,
                                        resolve_instruction_source)
from gqaprune.data.sources import hub_offline, read_records
from gqaprune.errors import GQAPruneError


def _corpus_split(source: str) -> str:
    return "validation" if source.lower() == "c4" else "train"


def check_source(source: str, flag: str = "--calibration") -> None:
    """Fail now, before any model is loaded, when the calibration source cannot be read."""
    if Path(source).expanduser().is_file():
        return
    if source.lower() in ALPACA_IDS:
        if resolve_instruction_source(source).startswith("hub:") and hub_offline():
            raise GQAPruneError(f"{flag} {source}: no local copy of Alpaca and the Hub is offline; set "
                                "GQAPRUNE_DATA_DIR to a folder laid out like shared/data, or pass a local file.")
        return
    check_corpus(source, _corpus_split(source), flag)


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
    corpus = load_text_corpus(source, "test" if p.is_file() else _corpus_split(source))
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


def calibration_batch(tokenizer, source: str, num_samples: int, seq_len: int, seed: int = 0,
                      fmt: str = "prompt") -> tuple[torch.Tensor, str]:
    """``num_samples`` windows of ``seq_len`` tokens from ``source`` -> LongTensor (N, L), description.

    Documents are shuffled by ``seed``, joined with EOS into one token stream and cut into
    non-overlapping windows, so no window is padded. ``fmt``: how instruction records become text
    (``prompt``: Alpaca template + response; ``text``: plain, no template).
    """
    if seq_len < 2:
        raise GQAPruneError(f"--seq-len {seq_len}: must be at least 2 tokens")
    if num_samples < 1:
        raise GQAPruneError(f"--num-samples {num_samples}: must be at least 1")
    need = num_samples * seq_len
    # ~4 characters per token for English BPE; ask for 2x that and top up if short.
    texts, desc = calibration_texts(source, seed, max_chars=need * 8, fmt=fmt)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise GQAPruneError(
            f"--calibration {source}: only {len(stream)} tokens available, {need} needed "
            f"({num_samples} samples x {seq_len} tokens); use more data or lower --num-samples / --seq-len"
        )
    ids = torch.tensor(stream[:need], dtype=torch.long).view(num_samples, seq_len)
    return ids, f"{desc}: {num_samples} x {seq_len} tokens"
