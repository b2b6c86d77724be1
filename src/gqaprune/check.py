"""``gqaprune check DIR``: the seed guide's pre-flight checklist for a pruned checkpoint.

Shapes are read from the safetensors headers, not from a loaded model, so a checkpoint
whose shapes are broken (and that therefore cannot load) still gets a per-layer report
of what is wrong.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from gqaprune.errors import GQAPruneError
from gqaprune.memory import available_memory
from gqaprune.models.family import FAMILIES, family_for_type, layer_widths
from gqaprune.models.layout import head_dim, q_per_kv
from gqaprune.options import ModelArgs, opt
from gqaprune.recover.options import LoraRankArgs

log = logging.getLogger(__name__)

DEFAULT_WINDOW, DEFAULT_MAX_TOKENS = 128, 65536   # when neither the plan nor a flag says
GUIDE_PPL_LIMIT = 50.0   # the seed guide's pre-flight limit, stated for Llama-3-8B (dense 19.66 = REFERENCE_PPL)


@dataclass
class CheckOptions(LoraRankArgs, ModelArgs):
    checkpoint: str = opt(None, "checkpoint folder to check")
    max_ppl: float | None = opt(None, "absolute override: fail when wikitext2 PPL is above this (default: the "
                                "guide's limit 50 scaled as the tiers are, 50 / 19.66 x the dense model's PPL)")
    base_model: str | None = opt(None, "the dense model the checkpoint was pruned from: measure its PPL on the same "
                                 "tokens to scale the limit (default: the dense PPL recorded in prune_plan.json)")
    seq_len: int | None = opt(None, "perplexity window length (default: the window of the dense PPL in the plan, "
                              f"else {DEFAULT_WINDOW})")
    ppl_max_tokens: int | None = opt(None, "score the first N wikitext2 test tokens, 0 = all (default: as many as "
                                     f"the dense PPL in the plan, else {DEFAULT_MAX_TOKENS})")
    expect_q_per_kv: int | None = opt(None, "the original model's Q:KV ratio (default: read from the plan/config)")
    micro_batch_size: int = opt(4, "LoRA memory estimate: micro batch (seed guide: 4)")
    cutoff_len: int = opt(256, "LoRA memory estimate: sequence length (seed guide: 256)")
    gradient_checkpointing: bool = opt(True, "LoRA memory estimate: with gradient checkpointing")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_ppl is not None and not self.max_ppl > 0:
            raise GQAPruneError(f"--max-ppl {self.max_ppl}: must be a positive perplexity")
        if self.seq_len is not None and self.seq_len < 2:
            raise GQAPruneError(f"--seq-len {self.seq_len}: a window needs at least 2 tokens")
        if self.ppl_max_tokens is not None and self.ppl_max_tokens < 0:
            raise GQAPruneError(f"--ppl-max-tokens {self.ppl_max_tokens}: give a token count, or 0 for all")


@dataclass
class CheckRow:
    name: str
    ok: bool
    detail: str


@dataclass
class CheckResult:
    rows: list[CheckRow] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def _tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """name -> shape from every safetensors file's header (no weights read)."""
    import struct

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GQAPruneError(f"{folder}: no .safetensors files")
    shapes = {}
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise GQAPruneError(f"{f}: truncated safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                raise GQAPruneError(f"{f}: corrupt safetensors header")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise GQAPruneError(f"{f}: corrupt safetensors header ({e})") from e
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _config_kv(cfg: dict, i: int) -> int | None:
    """KV heads the config gives layer ``i`` (per-layer list of the per-layer class, else the scalar)."""
    per_layer = cfg.get("kv_heads_per_layer")
    if isinstance(per_layer, list) and i < len(per_layer):
        return per_layer[i]
    return cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")


def layer_report(cfg: dict, shapes: dict[str, list[int]], expect_r: int | None) -> tuple[list[dict], list[str]]:
    """Per-layer heads / Q:KV / MLP from tensor shapes, and a list of problems found (each naming its layer)."""
    d = head_dim(cfg)
    r = expect_r or q_per_kv(cfg)
    rows, problems = [], []
    fam = family_for_type(cfg.get("model_type")) or FAMILIES["llama"]   # an unsupported type has its own FAIL row
    for i in range(cfg["num_hidden_layers"]):
        try:
            q, k, v, o_in, mlp = layer_widths(fam, shapes, i)
        except KeyError as e:
            problems.append(f"layer {i}: tensor {e} missing")
            continue
        whole = all(x % d == 0 for x in (q, k, v, o_in))
        n_q, n_kv = q // d, k // d
        ratio = n_q / n_kv if n_kv else float("inf")
        ok = whole and k == v and q == o_in and n_kv >= 1 and ratio == r
        want_kv = _config_kv(cfg, i)
        if ok and want_kv is not None and want_kv != n_kv:
            ok = False
            problems.append(f"layer {i}: config.json gives {want_kv} KV heads, its weights have {n_kv} "
                            f"(k_proj {k} rows / head_dim {d})")
        elif not ok:
            problems.append(f"layer {i}: q {q}, k {k}, v {v}, o_in {o_in} rows with head_dim {d} "
                            f"give Q:KV {ratio:g} (expected {r})")
        rows.append({"layer": i, "q_heads": q / d if not whole else n_q, "kv_heads": k / d if not whole else n_kv,
                     "q_per_kv": ratio, "mlp": mlp, "ok": ok})
    return rows, problems


def lora_memory_estimate(n_params: int, cfg: dict, layers: list[dict], *, micro_batch: int, seq_len: int, lora_r: int,
                         gradient_checkpointing: bool, bytes_per_weight: int = 2) -> dict:
    """Rough LoRA fine-tuning memory (bytes): frozen weights + LoRA params with Adam + activations.

    Activations follow Korthikanti et al. (2022) for 16-bit training, per layer and token:
    34*h bytes plus 5*heads*s bytes for attention scores (0 with SDPA/flash); with gradient
    checkpointing only each layer's input (2*h bytes) is kept, plus one layer's full set.
    """
    h = cfg["hidden_size"]
    d = head_dim(cfg)
    lora = 0
    for row in layers:
        q, kv, m = row["q_heads"] * d, row["kv_heads"] * d, row["mlp"]
        # q,k,v,o,gate,up,down: each adds r*(in+out)
        lora += lora_r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + m) + (m + h))
    tokens = micro_batch * seq_len
    per_layer = 34 * h * tokens
    n_layers = cfg["num_hidden_layers"]
    act = (2 * h * tokens * n_layers + per_layer) if gradient_checkpointing else per_layer * n_layers
    logits = tokens * cfg["vocab_size"] * 4 * 2  # fp32 logits and their gradient
    weights = n_params * bytes_per_weight
    opt_state = lora * (4 + 4 + 4 + 4)  # fp32 LoRA weight, grad, Adam m and v
    total = weights + opt_state + act + logits
    return {"weights": weights, "lora_params": lora, "lora_and_adam": opt_state, "activations": act,
            "logits": logits, "total": int(total * 1.2), "overhead_factor": 1.2}


def _read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise GQAPruneError(f"check {folder}: config.json is not valid JSON ({e}); re-create or re-download the "
                            "checkpoint") from e
    if not isinstance(cfg, dict):
        raise GQAPruneError(f"check {folder}: config.json holds {type(cfg).__name__}, not a model config")
    return cfg


def _architecture(cfg: dict) -> CheckRow:
    from gqaprune.models.family import supported

    mt = cfg.get("model_type")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers") if k not in cfg]
    ok = family_for_type(mt) is not None and not missing
    why = (f"model_type {mt!r}" + (f", config has no {', '.join(missing)}" if missing else "")
           + f"; gqaprune checks these families: {supported()}")
    return CheckRow("supported architecture", ok, f"model_type {mt}" if ok else why)


@dataclass
class PPLLimit:
    """The PPL the checkpoint must stay under, and the protocol it is measured on."""

    limit: float
    why: str                      # how the limit was set, for the table
    seq_len: int
    max_tokens: int | None        # None = the whole test split
    dense_ppl: float | None = None


def _recorded_dense(folder: Path) -> dict | None:
    """The wikitext2 test PPL of the source model that ``gqaprune prune --eval-ppl`` recorded in the plan."""
    from gqaprune.data.corpora import load_text_corpus

    try:
        before = json.loads((folder / "prune_plan.json").read_text()).get("provenance", {}).get("ppl_before") or []
    except (OSError, ValueError, AttributeError):
        return None
    name = load_text_corpus("wikitext2", "test").dataset
    return next((b for b in before if isinstance(b, dict) and b.get("dataset") == name and b.get("split") == "test"
                 and b.get("stride") == b.get("seq_len") and b.get("ppl")), None)


def ppl_limit(folder: Path, opts: CheckOptions, measure_dense) -> PPLLimit:
    """The limit and protocol: --max-ppl as given, else 50 / 19.66 x the dense PPL on the same tokens.

    The dense PPL is the one the plan recorded (its window and token count are then used, unless
    --seq-len / --ppl-max-tokens ask for others), or ``measure_dense(seq_len, max_tokens)`` of
    --base-model. Without either, the guide's absolute 50 applies, and the table says it is unscaled.
    """
    from gqaprune.evaluate.compare import REFERENCE_PPL

    rec = _recorded_dense(folder) if opts.base_model is None else None
    seq_len = opts.seq_len or (rec["seq_len"] if rec else DEFAULT_WINDOW)
    if opts.ppl_max_tokens is not None:
        max_tokens = opts.ppl_max_tokens or None
    else:
        max_tokens = rec.get("max_tokens") if rec else DEFAULT_MAX_TOKENS
    if opts.max_ppl is not None:
        return PPLLimit(opts.max_ppl, f"--max-ppl {opts.max_ppl:g} (absolute)", seq_len, max_tokens)
    scale = GUIDE_PPL_LIMIT / REFERENCE_PPL
    if opts.base_model is not None:
        dense, where = measure_dense(seq_len, max_tokens), f"--base-model {opts.base_model} on the same tokens"
    elif rec is not None and rec["seq_len"] == seq_len and rec.get("max_tokens") == max_tokens:
        dense, where = float(rec["ppl"]), "prune_plan.json (measured by gqaprune prune on the same tokens)"
    else:
        why = ("the plan records no dense wikitext2 PPL" if rec is None else
               f"the plan's dense PPL is on window {rec['seq_len']}, {rec.get('max_tokens') or 'all'} tokens")
        return PPLLimit(GUIDE_PPL_LIMIT, f"the guide's absolute {GUIDE_PPL_LIMIT:g}, unscaled: {why}; pass "
                        "--base-model to scale it", seq_len, max_tokens)
    return PPLLimit(scale * dense, f"{GUIDE_PPL_LIMIT:g} / {REFERENCE_PPL} x dense PPL {dense:.2f} from {where}",
                    seq_len, max_tokens, dense)


def _base_model_ppl(opts: CheckOptions, tok):
    """measure_dense for ppl_limit: --base-model's PPL, refused when its vocabulary is not the checkpoint's."""
    from gqaprune.evaluate.perplexity import perplexity
    from gqaprune.models.io import load_model

    def measure(seq_len: int, max_tokens: int | None) -> float:
        base, btok = load_model(opts.base_model, dtype=opts.dtype, device=opts.device, flag="--base-model")
        if btok is not None and tok is not None and btok.get_vocab() != tok.get_vocab():
            raise GQAPruneError(f"--base-model {opts.base_model}: its tokenizer differs from {opts.checkpoint}'s "
                                f"({len(btok)} vs {len(tok)} tokens, or other ids), so its PPL is on other tokens and "
                                "cannot scale the limit; pass the model the checkpoint was pruned from, or --max-ppl")
        p = perplexity(base, btok, "wikitext2", seq_len=seq_len, max_tokens=max_tokens)
        del base
        return p.ppl

    return measure


def _loads(folder: Path, opts: CheckOptions, res: CheckResult) -> None:
    """The 'model loads' and PPL rows."""
    from gqaprune.evaluate.perplexity import perplexity
    from gqaprune.models.io import load_model

    try:
        model, tok = load_model(str(folder), dtype=opts.dtype, device=opts.device)
    except GQAPruneError as e:
        lim = ppl_limit(folder, replace(opts, base_model=None), None)
        res.rows.append(CheckRow("model loads", False, str(e).splitlines()[0]))
        res.rows.append(CheckRow(f"wikitext2 PPL < {lim.limit:.4g}", False, "not measured: the model does not load"))
        return
    res.rows.append(CheckRow("model loads", True, f"{type(model).__name__} via from_pretrained"))
    lim = ppl_limit(folder, opts, _base_model_ppl(opts, tok))
    p = perplexity(model, tok, "wikitext2", seq_len=lim.seq_len, max_tokens=lim.max_tokens)
    ratio = f" = {p.ppl / lim.dense_ppl:.2f}x dense" if lim.dense_ppl else ""
    res.rows.append(CheckRow(f"wikitext2 PPL < {lim.limit:.4g}", p.ppl < lim.limit,
                             f"{p.line()}{ratio}; limit: {lim.why}"))


def check(opts: CheckOptions) -> CheckResult:
    """Run the checklist; the result's ``ok`` is the pass/fail verdict."""
    import math

    folder = Path(opts.checkpoint)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise GQAPruneError(f"check {opts.checkpoint}: not a checkpoint folder (no config.json)")
    if opts.base_model is not None:
        from gqaprune.models.io import resolve_model_ref

        resolve_model_ref(opts.base_model, "--base-model")   # a wrong name fails before any work
    cfg = _read_config(folder)
    res = CheckResult(rows=[_architecture(cfg)])
    if not res.rows[0].ok:
        return res
    shapes = _tensor_shapes(folder)
    expect_r = opts.expect_q_per_kv
    plan_file = folder / "prune_plan.json"
    if expect_r is None and plan_file.is_file():
        expect_r = json.loads(plan_file.read_text()).get("source_shape", {}).get("q_per_kv")
    res.layers, problems = layer_report(cfg, shapes, expect_r)
    r = expect_r or q_per_kv(cfg)
    res.rows.append(CheckRow("Q:KV ratio kept in every layer", not problems,
                             f"{r}:1 in all {len(res.layers)} layers" if not problems else "; ".join(problems[:3])))
    d = cfg.get("head_dim")
    hd_ok = d is not None and all(x["kv_heads"] == int(x["kv_heads"]) for x in res.layers)
    res.rows.append(CheckRow("head_dim explicit and consistent", hd_ok,
                             f"head_dim {d}" if hd_ok else f"head_dim {d!r} missing or does not divide k_proj rows"))
    n_params = sum(math.prod(s) for k, s in shapes.items() if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight"))
    res.rows.append(CheckRow("parameter count", True, f"{n_params:,} parameters"))
    _loads(folder, opts, res)
    est = lora_memory_estimate(n_params, cfg, [x for x in res.layers if x["ok"]] or res.layers,
                               micro_batch=opts.micro_batch_size, seq_len=opts.cutoff_len, lora_r=opts.lora_r,
                               gradient_checkpointing=opts.gradient_checkpointing)
    avail, where = available_memory(opts.device)
    res.rows.append(CheckRow(
        "LoRA fine-tuning memory fits", est["total"] < avail,
        f"needs ~{est['total'] / 2**30:.2f} GiB (bf16 weights, micro batch {opts.micro_batch_size} x "
        f"{opts.cutoff_len} tokens, r={opts.lora_r}, grad ckpt {'on' if opts.gradient_checkpointing else 'off'}) "
        f"vs {avail / 2**30:.1f} GiB {where}"))
    return res
