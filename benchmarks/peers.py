"""Torch-Pruning (the seed guide's "v2") as a peer for the gqaprune benchmark.

Prunes the way Torch-Pruning's own LLM example does (examples/LLMs/prune_llm.py in
VainF/Torch-Pruning): ``MetaPruner`` with local (per-group) ranking, ``num_heads`` for
q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False`` (RoPE stays intact),
``head_pruning_ratio = pruning_ratio``, ``ignored_layers=[lm_head]``, ``round_to=4``;
then the attention/config attributes are updated the way the example does, plus what
transformers 5 needs (``num_key_value_groups``, an explicit ``head_dim``).

What it does to a GQA model, so the benchmark can report it rather than assume it:
every KV head is kept and query heads are removed inside each KV group, so Q:KV
changes; the hidden size (embeddings, norms, every projection's input) is pruned too.
Tracing needs eager attention; with SDPA it fails (``trace_failure_sdpa`` records how).

Nothing here prints; the benchmark script does.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field

import torch

IMPORTANCES = ("magnitude", "taylor")


def _tp():
    import torch_pruning as tp

    return tp


def _inner(model):
    return model.model


def tp_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


# --------------------------------------------------------------------------- budget
def predicted_shape(config, ratio: float, round_to: int = 4) -> dict:
    """Widths Torch-Pruning's local MetaPruner leaves at ``pruning_ratio = head_pruning_ratio = ratio``.

    Mirrors base_pruner._prune: channels kept = int(n * (1 - r)) rounded down to ``round_to``;
    query heads removed per layer = ceil(r * n_q), spread as ceil(./n_kv) per KV group; KV heads kept.
    The benchmark checks the prediction against the real pruned model.
    """
    def kept(n: int) -> int:
        k = int(n * (1 - ratio))
        if n - k <= 0:
            return n
        return k - k % round_to if round_to else k

    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    per_group = math.ceil(math.ceil(ratio * n_q) / n_kv) if ratio > 0 else 0
    return {"hidden": kept(config.hidden_size), "mlp": kept(config.intermediate_size),
            "q_heads": n_q - n_kv * per_group, "kv_heads": n_kv}


def predicted_params(config, ratio: float, round_to: int = 4) -> int:
    """Parameters after TP at ``ratio`` (tied embeddings counted once; Llama, no biases)."""
    s = predicted_shape(config, ratio, round_to)
    h, m, d = s["hidden"], s["mlp"], config.head_dim
    per_layer = 2 * h * s["q_heads"] * d + 2 * h * s["kv_heads"] * d + 3 * h * m + 2 * h
    emb = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * per_layer + emb + h


def choose_ratio(config, target_params: int, round_to: int = 4, step: float = 0.0005) -> float:
    """The TP ``pruning_ratio`` whose predicted parameter count is nearest ``target_params``."""
    best = None
    for i in range(1, int(0.95 / step)):
        r = round(i * step, 6)
        err = abs(predicted_params(config, r, round_to) - target_params)
        if best is None or err < best[0]:
            best = (err, r)
    return best[1]


# --------------------------------------------------------------------------- gradients
def taylor_grads(model, ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Gradients of the LM loss summed over the calibration batches (what TaylorImportance reads)."""
    model.train()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    for b in range(0, ids.shape[0], batch_size):
        x = ids[b:b + batch_size]
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads


# --------------------------------------------------------------------------- pruning
@dataclass
class TPOutcome:
    importance: str
    ratio: float
    ok: bool
    error: str | None = None
    prune_s: float = 0.0
    params_raw: int | None = None        # sum over model.parameters() right after TP (its tie broken)
    params: int | None = None            # tied embeddings counted once (after re-tying, as config says)
    predicted_params: int | None = None
    retied: bool = False
    hidden: int | None = None
    mlp: list[int] = field(default_factory=list)
    q_heads: list[int] = field(default_factory=list)
    kv_heads: list[int] = field(default_factory=list)
    runs: str | None = None              # "ok" or the forward's error
    save_reload: str | None = None       # "ok (max |dlogit| ...)" or the error

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def q_per_kv(self) -> list[float]:
        return [q / k for q, k in zip(self.q_heads, self.kv_heads)]


def _num_heads(model) -> dict:
    cfg = model.config
    heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads[m.q_proj] = cfg.num_attention_heads
            heads[m.k_proj] = cfg.num_key_value_heads
            heads[m.v_proj] = cfg.num_key_value_heads
    return heads


def _importance(name: str):
    tp = _tp()
    if name == "magnitude":  # the LLM example's GroupNormImportance(p=2, group_reduction='mean')
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean")
    raise ValueError(f"importance {name!r}: choose one of {IMPORTANCES}")


def build_pruner(model, example_ids: torch.Tensor, importance: str, ratio: float, round_to: int = 4):
    tp = _tp()
    return tp.pruner.MetaPruner(
        model,
        example_inputs=example_ids,
        importance=_importance(importance),
        global_pruning=False,
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head],
        num_heads=_num_heads(model),
        prune_num_heads=True,
        prune_head_dims=False,     # as the example: keep head_dim so RoPE needs no change
        head_pruning_ratio=ratio,
        round_to=round_to,
        output_transform=lambda out: out.logits,  # HF returns a ModelOutput; trace the logits
    )


def fix_attributes(model) -> None:
    """Make config and modules agree with the pruned weights (the example's block, for transformers 5)."""
    cfg = model.config
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    cfg.hidden_size = model.lm_head.in_features
    cfg.head_dim = d  # explicit: hidden_size // heads is no longer the head size
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            q, kv = m.q_proj.out_features // d, m.k_proj.out_features // d
            m.num_heads, m.num_key_value_heads = q, kv  # the example's attributes (unused by transformers 5)
            m.hidden_size = m.q_proj.out_features
            m.num_key_value_groups = q // kv  # used by eager attention's repeat_kv
            if q % kv:
                raise RuntimeError(f"{name}: {q} query heads over {kv} KV heads is not a whole Q:KV ratio")
            cfg.num_attention_heads, cfg.num_key_value_heads = q, kv
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
            if hasattr(m, "intermediate_size"):
                m.intermediate_size = m.gate_proj.out_features
            if hasattr(m, "hidden_size"):
                m.hidden_size = m.gate_proj.in_features


def retie(model) -> bool:
    """TP replaces embed_tokens.weight and lm_head.weight by two (equal) tensors; tie them again."""
    emb, head = model.get_input_embeddings(), model.lm_head
    if getattr(model.config, "tie_word_embeddings", False) and emb.weight is not head.weight \
            and emb.weight.shape == head.weight.shape and torch.equal(emb.weight, head.weight):
        head.weight = emb.weight
        return True
    return False


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg[:300]


def tp_prune(model, example_ids: torch.Tensor, importance: str, ratio: float, *, grads: dict | None = None,
             round_to: int = 4) -> tuple[object, TPOutcome]:
    """Prune ``model`` (modified in place; pass a copy) with Torch-Pruning. Never raises: failures are recorded."""
    out = TPOutcome(importance=importance, ratio=ratio, ok=False,
                    predicted_params=predicted_params(model.config, ratio, round_to))
    t0 = time.perf_counter()
    try:
        model.config.use_cache = False
        if importance == "taylor":
            if grads is None:
                raise ValueError("taylor importance needs gradients (taylor_grads)")
            for n, p in model.named_parameters():
                if n in grads:
                    p.grad = grads[n].clone()
        pruner = build_pruner(model, example_ids, importance, ratio, round_to)
        for g in pruner.step(interactive=True):
            g.prune()
        del pruner
        model.zero_grad(set_to_none=True)
        out.params_raw = sum(p.numel() for p in model.parameters())
        out.retied = retie(model)
        fix_attributes(model)
        model.config.use_cache = True
        model.eval()
        out.prune_s = time.perf_counter() - t0
        out.params = sum(p.numel() for p in model.parameters())
        d = model.config.head_dim
        out.hidden = model.config.hidden_size
        for layer in _inner(model).layers:
            out.q_heads.append(layer.self_attn.q_proj.out_features // d)
            out.kv_heads.append(layer.self_attn.k_proj.out_features // d)
            out.mlp.append(layer.mlp.gate_proj.out_features)
        out.ok = True
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result to report
        out.prune_s = time.perf_counter() - t0
        out.error = _short_error(e)
        out.ok = False
        return model, out
    try:
        with torch.no_grad():
            model(input_ids=example_ids, use_cache=False)
        out.runs = "ok"
    except Exception as e:  # noqa: BLE001
        out.runs = _short_error(e)
    return model, out


def save_reload(model, tokenizer, out_dir, probe_ids: torch.Tensor) -> str:
    """save_pretrained, then AutoModelForCausalLM.from_pretrained; 'ok (...)' or the error text."""
    from transformers import AutoModelForCausalLM

    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    except Exception as e:  # noqa: BLE001
        return "save_pretrained failed: " + _short_error(e)
    try:
        re = AutoModelForCausalLM.from_pretrained(out_dir, dtype=next(model.parameters()).dtype,
                                                  attn_implementation=model.config._attn_implementation).eval()
    except Exception as e:  # noqa: BLE001
        return "from_pretrained failed: " + _short_error(e)
    try:
        with torch.no_grad():
            a = model(input_ids=probe_ids, use_cache=False).logits
            b = re(input_ids=probe_ids, use_cache=False).logits
        diff = (a - b).abs().max().item()
        return f"ok (max |dlogit| {diff:.2e})" if diff < 1e-3 else f"reloads but differs: max |dlogit| {diff:.3g}"
    except Exception as e:  # noqa: BLE001
        return "reloaded model fails forward: " + _short_error(e)


def trace_failure_sdpa(model, example_ids: torch.Tensor, ratio: float = 0.2) -> str:
    """Run TP (magnitude) on a copy with SDPA attention; 'ok' or the error text (the guide says it fails)."""
    import copy

    m = copy.deepcopy(model)
    try:
        m.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - older transformers
        m.config._attn_implementation = "sdpa"
    _, out = tp_prune(m, example_ids, "magnitude", ratio)
    del m
    if not out.ok:
        return "fails: " + (out.error or "")
    return "ok" if out.runs == "ok" else "prunes, then forward fails: " + str(out.runs)


def format_exc() -> str:
    return traceback.format_exc(limit=3)
