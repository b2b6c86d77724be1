"""Tokenised fine-tuning examples: Alpaca records -> token ids and loss labels, the fixed-seed train/val
split, and the on-disk cache of both (keyed by tokenizer, data content and settings).

``prepare_data(opts, tokenizer, records)`` reads these fields of ``opts`` (the fine-tuning
options' data group plus the seed): ``data_path``, ``cutoff_len``, ``val_set_size``,
``train_on_inputs``, ``add_eos_token``, ``max_train_samples``, ``cache_dataset``,
``cache_dir`` and ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1          # bump when the cached arrays change meaning
_ARRAYS = ("ids", "labels", "offsets", "record_idx")


@dataclass
class TokenizedSplit(torch.utils.data.Dataset):
    """Variable-length examples stored flat: example i is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray       # int32 [total tokens], all examples concatenated
    labels: np.ndarray    # int32 [total tokens], -100 where the token is not in the loss
    offsets: np.ndarray   # int64 [n + 1]
    record_idx: np.ndarray  # int64 [n], index of each example in the loaded records
    is_train: bool = True   # the collator's sample log records training batches only

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.ids[a:b], "labels": self.labels[a:b], "idx": int(self.record_idx[i]),
                "train": self.is_train}

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[list[int]], idx: list[int]) -> "TokenizedSplit":
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        flat = lambda xs: np.fromiter((t for x in xs for t in x), dtype=np.int32, count=int(offsets[-1]))  # noqa: E731
        return cls(flat(ids), flat(labels), offsets, np.asarray(idx, dtype=np.int64))


def prompt_template_tokens(tokenizer) -> int:
    """Tokens in the Alpaca template with an empty instruction: the least any prompt takes."""
    from gqaprune.data.instructions import alpaca_prompt

    return len(tokenizer(alpaca_prompt("", ""))["input_ids"])


def tokenize_records(records: list[dict], indices, tokenizer, *, cutoff_len: int, train_on_inputs: bool,
                     add_eos_token: bool) -> tuple[TokenizedSplit, int]:
    """Alpaca-format examples -> token ids and labels (alpaca-lora's recipe); returns (split, dropped).

    The full text (prompt + response) is tokenised once and cut at ``cutoff_len``; with
    ``train_on_inputs`` off, the labels of the prompt's tokens are -100. Examples left with
    no token in the loss (prompt alone fills ``cutoff_len``) are dropped and counted.
    """
    from gqaprune.data.instructions import alpaca_prompt

    indices = [int(i) for i in indices]
    prompts = [alpaca_prompt(str(records[i].get("instruction", "")), str(records[i].get("input", "") or ""))
               for i in indices]
    fulls = [p + str(records[i].get("output", "")) for p, i in zip(prompts, indices)]
    eos = tokenizer.eos_token_id
    enc = tokenizer(fulls, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    prompt_lens = ([0] * len(indices) if train_on_inputs else
                   [len(x) for x in tokenizer(prompts, truncation=True, max_length=cutoff_len,
                                              padding=False)["input_ids"]])
    ids_out, lab_out, idx_out, dropped = [], [], [], 0
    for ids, plen, i in zip(enc, prompt_lens, indices):
        ids = list(ids)
        if add_eos_token and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = [-100] * min(plen, len(ids)) + ids[plen:]
        # labels[0] is never predicted (the causal-LM loss shifts by one): it alone does not count
        if not any(t != -100 for t in labels[1:]):
            dropped += 1
            continue
        ids_out.append(ids)
        lab_out.append(labels)
        idx_out.append(i)
    return TokenizedSplit.from_lists(ids_out, lab_out, idx_out), dropped


def split_indices(n: int, val_set_size: int, seed: int, max_train_samples: int | None) -> tuple[list[int], list[int]]:
    """(train, val) record indices: a fixed-seed permutation, val first, train capped."""
    perm = np.random.default_rng(seed).permutation(n)
    val, train = perm[:val_set_size], perm[val_set_size:]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    return train.tolist(), val.tolist()


# ------------------------------------------------------------------------------ cache
def _tokenizer_fingerprint(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    probe = tokenizer("Below is an instruction.\n### Response:\nok")["input_ids"]
    return {"class": type(tokenizer).__name__, "name": getattr(tokenizer, "name_or_path", ""), "vocab_sha256": h,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, "probe": probe}


def _records_fingerprint(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.get("instruction", ""), r.get("input", ""), r.get("output", "")],
                            ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("GQAPRUNE_CACHE_DIR")
    return Path(env).expanduser() / "tokenized" if env else Path.home() / ".cache" / "gqaprune" / "tokenized"


def _cache_key(opts, tokenizer, records: list[dict]) -> tuple[str, dict]:
    from gqaprune.data.instructions import alpaca_prompt, resolve_instruction_source

    meta = {
        "format": CACHE_FORMAT,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "data": {"data_path": opts.data_path, "source": resolve_instruction_source(opts.data_path),
                 "n_records": len(records), "content_sha256": _records_fingerprint(records)},
        "settings": {"cutoff_len": opts.cutoff_len, "train_on_inputs": opts.train_on_inputs,
                     "add_eos_token": opts.add_eos_token, "val_set_size": opts.val_set_size,
                     "max_train_samples": opts.max_train_samples, "seed": opts.seed,
                     "template": hashlib.sha256((alpaca_prompt("{i}", "{x}") + alpaca_prompt("{i}")).encode())
                     .hexdigest()},
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24], meta


def _save_cache(folder: Path, train: TokenizedSplit, val: TokenizedSplit | None, meta: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    arrays = {f"train_{k}": getattr(train, k) for k in _ARRAYS}
    if val is not None:
        arrays.update({f"val_{k}": getattr(val, k) for k in _ARRAYS})
    np.savez(tmp / "tokens.npz", **arrays)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(folder: Path) -> tuple[TokenizedSplit, TokenizedSplit | None] | None:
    f = folder / "tokens.npz"
    if not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            get = lambda p: TokenizedSplit(*(z[f"{p}_{k}"] for k in _ARRAYS))  # noqa: E731
            train, val = get("train"), (get("val") if "val_ids" in z.files else None)
    except (OSError, KeyError, ValueError) as e:
        log.warning("tokenised-data cache %s is unreadable (%s); tokenising again", folder, e)
        return None
    if val is not None:
        val.is_train = False
    return train, val


# ------------------------------------------------------------------------------ the datasets
def _check_sizes(opts, tokenizer, n: int) -> None:
    template = prompt_template_tokens(tokenizer)
    if opts.cutoff_len <= template:
        raise GQAPruneError(
            f"--cutoff_len {opts.cutoff_len}: shorter than the prompt template alone ({template} tokens with this "
            f"tokenizer), so no example would keep any response token. Use a larger value (the guide uses 256)."
        )
    check_val_split(opts.val_set_size, n)


def check_val_split(val_set_size: int, n: int) -> None:
    """Refuse a validation split that leaves nothing to train on, with advice that is never the same value."""
    if val_set_size < n:
        return
    advice = (f"use a smaller value (e.g. {max(1, n // 10):,}) or 0 for no validation split" if n >= 2 else
              "use --val_set_size 0 (no validation split), or more data")
    raise GQAPruneError(f"--val_set_size {val_set_size}: the data has only {n:,} record{'s' if n != 1 else ''}, so "
                        f"nothing would be left to train on; {advice}.")


def prepare_data(opts, tokenizer, records: list[dict]) -> tuple[TokenizedSplit, TokenizedSplit | None, str, dict]:
    """Split, tokenise (or load from the cache); returns (train, val, cache status off|hit|miss, info)."""
    _check_sizes(opts, tokenizer, len(records))
    status, folder, meta = "off", None, None
    if opts.cache_dataset:
        key, meta = _cache_key(opts, tokenizer, records)
        folder = (Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()) / key
        cached = _load_cache(folder)
        if cached is not None:
            train, val = cached
            log.info("loaded tokenised data from cache %s (%d train, %d val examples)", folder, len(train),
                     len(val) if val is not None else 0)
            return train, val, "hit", {"cache": str(folder), "dropped": None}
        status = "miss"
    train_idx, val_idx = split_indices(len(records), opts.val_set_size, opts.seed, opts.max_train_samples)
    kw = dict(cutoff_len=opts.cutoff_len, train_on_inputs=opts.train_on_inputs, add_eos_token=opts.add_eos_token)
    t0 = time.perf_counter()
    train, dropped = tokenize_records(records, train_idx, tokenizer, **kw)
    val, vdropped = tokenize_records(records, val_idx, tokenizer, **kw) if val_idx else (None, 0)
    if val is not None:
        val.is_train = False
    log.info("tokenised %d records in %.1f s (%d dropped: prompt longer than --cutoff_len %d)",
             len(train_idx) + len(val_idx), time.perf_counter() - t0, dropped + vdropped, opts.cutoff_len)
    if len(train) == 0:
        raise GQAPruneError(
            f"--data_path {opts.data_path}: no training example keeps a response token within --cutoff_len "
            f"{opts.cutoff_len}; raise --cutoff_len."
        )
    if val is not None and len(val) == 0:
        val = None
    if folder is not None:
        _save_cache(folder, train, val, meta)
        log.info("saved tokenised data to cache %s", folder)
    return train, val, status, {"cache": str(folder) if folder else None, "dropped": dropped + vdropped}


__all__ = ["TokenizedSplit", "default_cache_dir", "prepare_data", "prompt_template_tokens", "split_indices",
           "tokenize_records"]
