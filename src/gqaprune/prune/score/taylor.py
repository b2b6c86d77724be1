"""Gradient criteria: first-order Taylor scores from calibration gradients, in bounded memory.

  taylor         sum_w |w * g|                first-order Taylor, per weight
  taylor-vector  |sum_w w * g|                first-order Taylor of the whole unit
  taylor-second  sum_w |w*g - 0.5*(w*g)^2|    adds the diagonal-Fisher term (F ~ g^2)

Scores are accumulated per calibration batch ``b``: score = sum_b s(w, g_b). That is what
lets calibration free each gradient as soon as it is ready; with one batch holding every
sample it is exactly LLM-Pruner's estimator on the summed gradient.

Memory: only the projection weights require grad (embeddings, norms, lm_head are frozen),
and a ``register_post_accumulate_grad_hook`` on each projection folds its gradient into
per-unit scores the moment it is ready, then frees it; so the peak is the weights, one
projection's gradient, and the activations (reduced further by activation checkpointing).
``hooks=False`` runs the same arithmetic after each backward pass (all gradients of one
batch alive at once): a reference path for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from gqaprune.compat import transformers as tf_compat
from gqaprune.errors import GQAPruneError
from gqaprune.memory import release_freed_memory
from gqaprune.models.family import family_of
from gqaprune.models.layout import ModelLayout
from gqaprune.prune.score.units import layer_projections, reduce, zeros


@contextmanager
def _calibration_mode(model, gradient_checkpointing: bool):
    """Train-mode forward with only the projection weights requiring grad; restored afterwards."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training, use_cache = model.training, getattr(model.config, "use_cache", True)
    gc_was = tf_compat.checkpointing_enabled(model)
    scored = {id(lin.weight) for projs in layer_projections(model) for _, lin in projs} | \
        {id(lin.bias) for projs in layer_projections(model) for _, lin in projs if lin.bias is not None}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(id(p) in scored)
        model.config.use_cache = False
        if gradient_checkpointing:
            tf_compat.enable_checkpointing(model)
        model.train()  # HF only checkpoints in train mode; Llama has no dropout by default
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
        if gradient_checkpointing and not gc_was:
            tf_compat.disable_checkpointing(model)
        model.config.use_cache = use_cache
        model.train(was_training)


def _ce_sum(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")


def causal_lm_loss(model, x: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """The causal-LM loss on ``x`` (mean next-token cross-entropy, as ``model(labels=x).loss``).

    The vocabulary projection is done ``chunk_tokens`` positions at a time under activation
    checkpointing, so the full (batch, seq, vocab) logits, their log-softmax and their gradient
    never exist at once (at batch 8 x 128 tokens and a 49k vocabulary: 8*128*49152*4 bytes = 200 MB
    per copy).
    """
    body, head = model.get_decoder(), model.get_output_embeddings()
    if not family_of(model).plain_head or body is None or head is None:
        return model(input_ids=x, labels=x, use_cache=False).loss
    h = body(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
    h = h.reshape(-1, h.shape[-1])
    y = x[:, 1:].reshape(-1).to(h.device)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk_tokens):
        total = total + torch.utils.checkpoint.checkpoint(_ce_sum, head, h[s:s + chunk_tokens], y[s:s + chunk_tokens],
                                                          use_reentrant=False)
    return total / h.shape[0]


class _Accumulator:
    """Per-unit gradient scores; ``fold`` is called once per (param, batch), ``end_batch`` once per batch."""

    def __init__(self, model, layout: ModelLayout, term: Callable, signed: bool):
        self.layout, self.term, self.signed = layout, term, signed
        self.scores = zeros(layout)
        # a signed criterion sums its terms over the whole unit within a batch, then takes |.|
        self.batch = zeros(layout)
        self.params = []  # (layer, projection, is_bias, param)
        for i, projs in enumerate(layer_projections(model)):
            for proj, lin in projs:
                self.params.append((i, proj, False, lin.weight))
                if lin.bias is not None:
                    self.params.append((i, proj, True, lin.bias))

    def fold(self, i: int, proj, is_bias: bool, p: torch.Tensor, grad: torch.Tensor) -> None:
        t = self.term(p.detach().float() * grad.float())
        self.batch[i][proj.kind] += reduce(t, proj, self.layout.layers[i], self.layout, is_bias).double().cpu()

    def end_batch(self) -> None:
        for acc, cur in zip(self.scores, self.batch):
            for k in ("kv", "mlp"):
                acc[k] += cur[k].abs() if self.signed else cur[k]
                cur[k].zero_()


class Taylor:
    """A gradient criterion: ``term(w * g)`` summed per unit and batch (``signed``: |.| per batch)."""

    needs_calibration = True

    def __init__(self, name: str, term: Callable[[torch.Tensor], torch.Tensor], signed: bool = False):
        self.name, self.term, self.signed = name, term, signed

    def __call__(self, model, layout, ids, ctx) -> list[dict]:
        acc = _Accumulator(model, layout, self.term, self.signed)
        device = next(model.parameters()).device
        handles = []
        with _calibration_mode(model, ctx.gradient_checkpointing):
            if ctx.hooks:
                for i, proj, is_bias, p in acc.params:
                    def hook(param, i=i, proj=proj, is_bias=is_bias):
                        acc.fold(i, proj, is_bias, param, param.grad)
                        param.grad = None  # free it now: the score is all we keep
                    handles.append(p.register_post_accumulate_grad_hook(hook))
            try:
                for b in tqdm(range(0, ids.shape[0], ctx.batch_size), desc=f"calibrate ({self.name})",
                              disable=not ctx.progress):
                    loss = causal_lm_loss(model, ids[b:b + ctx.batch_size].to(device))
                    if not torch.isfinite(loss):
                        raise GQAPruneError(f"calibration loss is {loss.item()} on batch {b // ctx.batch_size}; "
                                            "the model or --dtype is numerically broken (try --dtype fp32)")
                    loss.backward()
                    if not ctx.hooks:
                        for i, proj, is_bias, p in acc.params:
                            acc.fold(i, proj, is_bias, p, p.grad)
                            p.grad = None
                    acc.end_batch()
                    del loss
                    release_freed_memory()
            finally:
                for h in handles:
                    h.remove()
        return [{k: v.float() for k, v in s.items()} for s in acc.scores]


def _abs(wg: torch.Tensor) -> torch.Tensor:
    return wg.abs()


def _signed(wg: torch.Tensor) -> torch.Tensor:
    return wg


def _second_order(wg: torch.Tensor) -> torch.Tensor:
    return (wg - 0.5 * wg * wg).abs()


TAYLOR = Taylor("taylor", _abs)
TAYLOR_VECTOR = Taylor("taylor-vector", _signed, signed=True)
TAYLOR_SECOND = Taylor("taylor-second", _second_order)
