"""llama.cpp as an engine (through llama-cpp-python): logits, perplexity on the project's protocol, and speed.

* ``load`` opens a GGUF with a float32 KV cache by default, so logits compare with transformers'
  fp32 to rounding (llama.cpp's default f16 cache alone moves tiny models' logits by ~1e-4).
* ``logits`` evaluates token ids in one batch and returns every position's logits.
* ``perplexity`` scores the same non-overlapping windows as evaluate/perplexity.py, on the same
  token ids (tokenised by the checkpoint's Hugging Face tokenizer), so the two numbers differ only
  by the engines' arithmetic.
* ``speed``: prefill = one batch of ``prompt_len`` tokens (a fresh cache each run); decode =
  ``new_tokens`` single-token steps, greedy on the logits, timed apart from the prefill; a warm-up,
  then the median of ``repeats`` runs.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np

from gqaprune.errors import GQAPruneError

GGML_TYPE_F32 = 0   # ggml_type for the KV cache (llama.h: GGML_TYPE_F32)


def load(path, *, n_ctx: int = 2048, threads: int | None = None, f32_cache: bool = True, logits_all: bool = True):
    from gqaprune.export.quantize import llama_cpp

    llama_cpp()   # installed? (a message that says how to install it)
    from llama_cpp import Llama

    from gqaprune.compat.llama_cpp import no_extra_buffers

    kw = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    try:
        with no_extra_buffers():   # llama.cpp's AMX buffers crash on quantized files (compat/llama_cpp.py)
            return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                         verbose=False, n_threads=threads, n_threads_batch=threads, **kw)
    except ValueError as e:   # llama-cpp-python's "Failed to load model from file"
        raise GQAPruneError(f"llama.cpp could not load {path} ({e}); run with verbose llama.cpp logs to see why") from e


def logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits of one fresh sequence."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity(llm, ids, seq_len: int = 128) -> tuple[float, int]:
    """(mean NLL, tokens scored) over non-overlapping ``seq_len`` windows of ``ids`` (the project's protocol)."""
    ids = [int(x) for x in ids]
    total, n = 0.0, 0
    for b in range(0, len(ids) - seq_len + 1, seq_len):
        w = ids[b:b + seq_len]
        lp = _log_softmax(logits(llm, w))[:-1]
        total -= float(lp[np.arange(seq_len - 1), w[1:]].sum())
        n += seq_len - 1
    if n == 0:
        raise GQAPruneError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return total / n, n


@dataclass
class Speed:
    prefill_tok_s: float
    decode_tok_s: float
    prefill_times: list[float]
    decode_times: list[float]


def _last_logits(llm, vocab: int) -> np.ndarray:
    """The logits llama.cpp computed for the last token of the last batch (no copy of the others)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))


def speed(llm, *, prompt_len: int = 512, new_tokens: int = 128, repeats: int = 5, warmup: int = 1,
          seed: int = 0) -> Speed:
    """Batch-1 prefill and greedy decode tokens/s (median of ``repeats`` after ``warmup`` runs).

    ``llm`` should be loaded with ``logits_all=False``: then llama.cpp computes the vocabulary
    projection for the last position of each batch only, as a server does.
    """
    rng = np.random.default_rng(seed)
    vocab = llm.n_vocab()
    prompt = rng.integers(3, vocab, prompt_len).tolist()
    pre, dec = [], []
    for r in range(warmup + repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        nxt = int(np.argmax(_last_logits(llm, vocab)))
        for _ in range(new_tokens):
            llm.eval([nxt])
            nxt = int(np.argmax(_last_logits(llm, vocab)))
        t2 = time.perf_counter()
        if r >= warmup:
            pre.append(t1 - t0)
            dec.append(t2 - t1)
    return Speed(prompt_len / statistics.median(pre), new_tokens / statistics.median(dec), pre, dec)


def ppl_of(nll: float) -> float:
    return math.exp(nll)
