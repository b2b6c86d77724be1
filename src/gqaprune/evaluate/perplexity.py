"""Perplexity with its protocol stated.

Protocol (LLM-Pruner's, the seed guide's): the split's text joined as the Hub rows are,
tokenised once, cut into non-overlapping windows of ``seq_len`` tokens (the tail that
does not fill a window is dropped); each window predicts its tokens 2..seq_len.
With ``stride < seq_len``, windows slide by ``stride`` and each scores only the tokens
not scored by the previous window (the Hugging Face sliding-window recipe), so every
scored token has up to ``seq_len - 1`` tokens of context. PPL = exp(mean NLL).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gqaprune.data.corpora import load_text_corpus
from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)


@dataclass
class PPLResult:
    dataset: str
    split: str
    seq_len: int
    stride: int
    n_tokens: int        # tokens whose NLL was scored
    ppl: float
    nll: float           # mean negative log-likelihood, nats per token
    source: str = ""
    max_tokens: int | None = None  # the token stream was cut to this many tokens (quick runs)

    def line(self) -> str:
        cut = f", first {self.max_tokens:,} tokens only" if self.max_tokens else ""
        return (f"{self.dataset} {self.split}: PPL {self.ppl:.3f} (window {self.seq_len}, stride {self.stride}, "
                f"{self.n_tokens:,} tokens scored{cut})")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def window_spans(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) for each window over ``n`` tokens; scored tokens are the last n_scored."""
    if stride >= seq_len:
        return [(b, b + seq_len, seq_len - 1) for b in range(0, n - seq_len + 1, seq_len)]
    spans, prev_end = [], 0
    for b in range(0, n, stride):
        e = min(b + seq_len, n)
        if e - b < 2:
            break
        scored = e - prev_end if prev_end else e - b - 1
        spans.append((b, e, min(scored, e - b - 1)))
        prev_end = e
        if e == n:
            break
    return spans


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, *, seq_len: int = 128, stride: int | None = None,
                      batch_size: int = 8, progress: bool = True, desc: str = "ppl") -> tuple[float, int]:
    """(mean NLL, tokens scored) of a 1-D token tensor under the protocol above."""
    if seq_len < 2:
        raise GQAPruneError(f"--seq-len {seq_len}: a window needs at least 2 tokens")
    stride = stride or seq_len
    if stride < 1 or stride > seq_len:
        raise GQAPruneError(f"--stride {stride}: must be between 1 and the window length {seq_len}")
    spans = window_spans(ids.numel(), seq_len, stride)
    if not spans:
        raise GQAPruneError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_n = 0.0, 0
    # Windows of equal length batch together (all of them when stride == seq_len).
    for i in tqdm(range(0, len(spans), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = spans[i:i + batch_size]
        length = chunk[0][1] - chunk[0][0]
        same = [s for s in chunk if s[1] - s[0] == length]
        rest = [s for s in chunk if s[1] - s[0] != length]
        for group in (same, *([[s] for s in rest])):
            if not group:
                continue
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            logits = model(input_ids=x, use_cache=False).logits      # (B, L, vocab), the model's dtype
            for row_logits, row_x, (_, _, k) in zip(logits, x, group):
                # one row's k scored positions in float32 at a time, not a (B, L, vocab) float32 copy and its
                # log-softmax (at window 2048 and a 128k vocabulary those are 8.6 GB each at batch 8);
                # cross_entropy's log-softmax is the same kernel, so the per-token NLLs are the same numbers
                nll = torch.nn.functional.cross_entropy(row_logits[-k - 1:-1].float(), row_x[-k:], reduction="none")
                total_nll += nll.double().sum().item()
                total_n += k
            del logits
    model.train(was_training)
    return total_nll / total_n, total_n


@torch.no_grad()
def first_nonfinite(model, ids: torch.Tensor) -> str:
    """Where the model's forward first produces NaN/inf on ``ids`` (1-D): the embeddings, a decoder
    layer, the final norm or the head; the weights that are non-finite there, if any."""
    from gqaprune.models.layout import decoder_layers

    base = getattr(model, "model", model)
    named = [("the embeddings", base.get_input_embeddings())]
    named += [(f"decoder layer {i}", layer) for i, layer in enumerate(decoder_layers(model))]
    named += [("the final norm", getattr(base, "norm", None)), ("the LM head", model.get_output_embeddings())]
    seen: list[str] = []

    def hook(name):
        def fn(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if not seen and torch.is_tensor(t) and not torch.isfinite(t).all():
                seen.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in named if m is not None]
    try:
        model(input_ids=ids[None, :128].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return "no module output is non-finite on the first window (the loss overflowed)"
    mod = dict(named)[seen[0]]
    bad = [n for n, w in mod.named_parameters() if not torch.isfinite(w).all()]
    return seen[0] + (f" (non-finite weights: {', '.join(bad[:4])})" if bad else "")


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """Tokenise a whole split once (the tokenizer's default special tokens, e.g. one BOS)."""
    if not text.strip():
        raise GQAPruneError("the evaluation text is empty")
    old = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)  # silence the "longer than max length" warning; we window it
    try:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    finally:
        if old is not None:
            tokenizer.model_max_length = old


def perplexity(model, tokenizer, dataset: str = "wikitext2", *, seq_len: int = 128, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 8, split: str = "test",
               progress: bool = True, ids: torch.Tensor | None = None) -> PPLResult:
    """Perplexity of ``model`` on a corpus split (or a local file), protocol stated in the result."""
    corpus = load_text_corpus(dataset, split)
    if ids is None:
        ids = tokenize_corpus(tokenizer, corpus.text)
    if max_tokens:
        ids = ids[:max_tokens]
    nll, n = perplexity_of_ids(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size,
                               progress=progress, desc=f"PPL {corpus.dataset}")
    if not math.isfinite(nll):
        raise GQAPruneError(f"{corpus.dataset} {corpus.split}: PPL is {math.exp(nll) if nll < 700 else nll} "
                            f"(mean NLL {nll}): the model is numerically broken; first non-finite output: "
                            f"{first_nonfinite(model, ids)}. Check the checkpoint (gqaprune check), or use --dtype fp32.")
    res = PPLResult(corpus.dataset, corpus.split, seq_len, stride or seq_len, n, math.exp(nll), nll,
                    corpus.source, max_tokens if max_tokens and max_tokens < 10**12 else None)
    log.info(res.line())
    return res
