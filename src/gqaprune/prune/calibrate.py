"""Calibration batches, and the gradient / activation statistics scoring needs.

Memory: gradient criteria never keep all gradients. Only the projection weights
require grad (embeddings, norms, lm_head are frozen), and a
``register_post_accumulate_grad_hook`` on each projection folds its gradient into
per-unit scores the moment it is ready, then frees it; so the peak is the weights,
one projection's gradient, and the activations (reduced further by gradient
checkpointing). ``use_hooks=False`` runs the same arithmetic after each backward pass
(all gradients of one batch alive at once): a reference path for tests.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from gqaprune.data import calibration_texts
from gqaprune.errors import GQAPruneError
from gqaprune.prune import importance as imp
from gqaprune.prune.structure import ModelLayout, decoder_layers
from gqaprune.sysmem import release_freed_memory

log = logging.getLogger(__name__)

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


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


@contextmanager
def _calibration_mode(model, gradient_checkpointing: bool):
    """Train-mode forward with only the projection weights requiring grad; restored afterwards."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training, use_cache = model.training, getattr(model.config, "use_cache", True)
    # transformers 5 renamed gradient -> activation checkpointing; accept either spelling.
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    # (hasattr first: reading the deprecated is_gradient_checkpointing warns on transformers 5)
    gc_attr = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    gc_was = bool(getattr(model, gc_attr, False))
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n.rsplit(".", 2)[-2] in ATTN_PROJS + MLP_PROJS)
        model.config.use_cache = False
        if gradient_checkpointing and enable is not None:
            key = "activation_checkpointing_kwargs" if "activation" in enable.__name__ else "gradient_checkpointing_kwargs"
            enable(**{key: {"use_reentrant": False}})
        model.train()  # HF only checkpoints in train mode; Llama has no dropout by default
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
        if gradient_checkpointing and not gc_was and disable is not None:
            disable()
        model.config.use_cache = use_cache
        model.train(was_training)


class _GradScorer:
    """Accumulates per-unit gradient scores; ``fold`` is called once per (param, batch)."""

    def __init__(self, model, layout: ModelLayout, criterion: str):
        self.criterion = criterion
        self.layout = layout
        self.scores = [{"kv": torch.zeros(s.n_kv, dtype=torch.float64), "mlp": torch.zeros(s.n_mlp, dtype=torch.float64)}
                       for s in layout.layers]
        # taylor-vector sums signed terms over the whole unit within a batch, then takes |.|.
        self.batch = [{"kv": torch.zeros(s.n_kv, dtype=torch.float64), "mlp": torch.zeros(s.n_mlp, dtype=torch.float64)}
                      for s in layout.layers]
        self.params = []  # (layer, proj, is_bias, param)
        for i, layer in enumerate(decoder_layers(model)):
            for proj in ATTN_PROJS + MLP_PROJS:
                lin = getattr(layer.self_attn if proj in ATTN_PROJS else layer.mlp, proj)
                self.params.append((i, proj, False, lin.weight))
                if lin.bias is not None:
                    self.params.append((i, proj, True, lin.bias))

    def fold(self, i: int, proj: str, is_bias: bool, p: torch.Tensor, grad: torch.Tensor) -> None:
        kind = imp.PROJ_AXIS[proj][0]
        n = self.layout.layers[i].n_kv if kind == "kv" else self.layout.layers[i].n_mlp
        t = imp.elementwise_term(self.criterion, p.detach(), grad)
        self.batch[i][kind] += imp.reduce_to_units(t, proj, n, is_bias).double().cpu()

    def end_batch(self) -> None:
        for acc, cur in zip(self.scores, self.batch):
            for k in ("kv", "mlp"):
                acc[k] += cur[k].abs() if self.criterion == "taylor-vector" else cur[k]
                cur[k].zero_()


# Model types whose logits are exactly lm_head(last hidden state), no scaling or soft-capping.
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "gqapruned_llama")


def _ce_sum(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")


def _loss(model, x: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """The causal-LM loss on ``x`` (mean next-token cross-entropy, as ``model(labels=x).loss``).

    The vocabulary projection is done ``chunk_tokens`` positions at a time under activation
    checkpointing, so the full (batch, seq, vocab) logits, their log-softmax and their gradient
    never exist at once: at batch 8 x 128 tokens and a 49k vocabulary that is ~600 MB less peak.
    """
    body, head = model.get_decoder(), model.get_output_embeddings()
    if getattr(model.config, "model_type", None) not in _PLAIN_HEAD_TYPES or body is None or head is None:
        return model(input_ids=x, labels=x, use_cache=False).loss
    h = body(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
    h = h.reshape(-1, h.shape[-1])
    y = x[:, 1:].reshape(-1).to(h.device)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk_tokens):
        total = total + torch.utils.checkpoint.checkpoint(_ce_sum, head, h[s:s + chunk_tokens], y[s:s + chunk_tokens],
                                                          use_reentrant=False)
    return total / h.shape[0]


def gradient_scores(model, layout: ModelLayout, criterion: str, ids: torch.Tensor, *, batch_size: int = 8,
                    use_hooks: bool = True, gradient_checkpointing: bool = True, progress: bool = True) -> list[dict]:
    """Per-layer {'kv': (n_kv,), 'mlp': (n_mlp,)} scores for a gradient criterion."""
    scorer = _GradScorer(model, layout, criterion)
    device = next(model.parameters()).device
    handles = []
    with _calibration_mode(model, gradient_checkpointing):
        if use_hooks:
            for i, proj, is_bias, p in scorer.params:
                def hook(param, i=i, proj=proj, is_bias=is_bias):
                    scorer.fold(i, proj, is_bias, param, param.grad)
                    param.grad = None  # free it now: the score is all we keep
                handles.append(p.register_post_accumulate_grad_hook(hook))
        try:
            for b in tqdm(range(0, ids.shape[0], batch_size), desc=f"calibrate ({criterion})", disable=not progress):
                loss = _loss(model, ids[b:b + batch_size].to(device))
                if not torch.isfinite(loss):
                    raise GQAPruneError(f"calibration loss is {loss.item()} on batch {b // batch_size}; "
                                        "the model or --dtype is numerically broken (try --dtype fp32)")
                loss.backward()
                if not use_hooks:
                    for i, proj, is_bias, p in scorer.params:
                        scorer.fold(i, proj, is_bias, p, p.grad)
                        p.grad = None
                scorer.end_batch()
                del loss
                release_freed_memory()
        finally:
            for h in handles:
                h.remove()
    return [{k: v.float() for k, v in s.items()} for s in scorer.scores]


@torch.no_grad()
def activation_means(model, ids: torch.Tensor, *, batch_size: int = 8, progress: bool = True):
    """Per layer: mean |x| of each input feature of o_proj and of down_proj over calibration tokens."""
    layers = decoder_layers(model)
    sums = [[None, None] for _ in layers]
    count = [0]
    handles = []
    for i, layer in enumerate(layers):
        for j, lin in enumerate((layer.self_attn.o_proj, layer.mlp.down_proj)):
            def hook(mod, inp, i=i, j=j):
                x = inp[0].detach().float().abs().reshape(-1, inp[0].shape[-1]).sum(0)
                sums[i][j] = x if sums[i][j] is None else sums[i][j] + x
            handles.append(lin.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    body = model.get_decoder() or model
    was = model.training
    model.eval()
    try:
        for b in tqdm(range(0, ids.shape[0], batch_size), desc="calibrate (activation)", disable=not progress):
            x = ids[b:b + batch_size].to(device)
            body(input_ids=x, use_cache=False)  # the hooks see all they need; no vocabulary logits
            count[0] += x.numel()
            release_freed_memory()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return [(o / count[0], d / count[0]) for o, d in sums]


def score_units(model, layout: ModelLayout, criterion: str, ids: torch.Tensor | None, *, seed: int = 0,
                batch_size: int = 8, use_hooks: bool = True, gradient_checkpointing: bool = True,
                progress: bool = True) -> list[dict]:
    """One score per unit for every layer: [{'kv': tensor(n_kv), 'mlp': tensor(n_mlp)}, ...]."""
    if criterion not in imp.CRITERIA:
        raise GQAPruneError(f"--criterion {criterion}: unknown; choose one of {', '.join(imp.CRITERIA)}")
    if criterion == "random":
        return imp.random_scores(layout, seed)
    if criterion == "magnitude":
        return [{k: v.cpu() for k, v in imp.magnitude_scores(layer, s.n_kv).items()}
                for layer, s in zip(decoder_layers(model), layout.layers)]
    if criterion == "activation":
        means = activation_means(model, ids, batch_size=batch_size, progress=progress)
        return [{k: v.cpu() for k, v in imp.activation_scores(layer, s.n_kv, o, d).items()}
                for layer, s, (o, d) in zip(decoder_layers(model), layout.layers, means)]
    return gradient_scores(model, layout, criterion, ids, batch_size=batch_size, use_hooks=use_hooks,
                           gradient_checkpointing=gradient_checkpointing, progress=progress)
