"""Inference speed and memory of several models side by side (``gqaprune bench``).

For each model and batch size this measures, on random prompt token ids:

* **prefill tokens/s** = ``batch * prompt_len / t_prefill``, where ``t_prefill`` is one
  forward pass over the ``batch x prompt_len`` prompt with a fresh KV cache, computing
  logits for the last position only (``logits_to_keep=1``, as ``generate()`` does);
* **decode tokens/s** = ``batch * new_tokens / t_decode``, where ``t_decode`` is a
  hand-written greedy loop of ``new_tokens`` single-token forward passes that reuse the
  prefill's KV cache (the first new token comes from the prefill's logits). The loop is
  timed on its own, so no prefill time has to be subtracted (which would add the noise
  of two measurements), and no EOS check can stop it early. It yields the same tokens
  as ``model.generate(do_sample=False)`` (tested); it skips generate()'s logits
  processors and stopping criteria, whose cost is small next to a forward pass;
* **peak memory** = the model's weight bytes + the peak extra memory of one
  prefill + decode run above what was in use just before it. On CUDA the extra is
  ``torch.cuda.max_memory_allocated()`` (after ``reset_peak_memory_stats``) minus
  ``memory_allocated()`` before the run. On CPU it is the peak resident set size
  (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS before the
  run, after ``malloc_trim`` has returned freed heap to the OS; where the reset is not
  possible, RSS is sampled with psutil every millisecond instead. Row field
  ``mem_method`` says which. Measured during the last warm-up run, not a timed one.

Timing (as nanoGPT's ``bench.py``): ``warmup`` untimed runs, then ``repeats`` timed runs
with ``torch.cuda.synchronize()`` before each clock read on GPUs (``time.perf_counter``);
the median is reported, and every run's time is kept in the JSON. Models are measured
round-robin (model A run 1, model B run 1, A run 2, ...) so that a slow phase of a shared
machine hits every model alike rather than one model's whole series.

Analytical FLOPs per token (multiply-add = 2 FLOPs; norms, RoPE, softmax and the
activation function are ignored, they are O(hidden) per token):

    prefill = 2 * M_layers + 2 * M_head / P + 4 * A * (P + 1) / 2
    decode  = 2 * M_layers + 2 * M_head     + 4 * A * (P + (N + 1) / 2)

``M_layers``: weights of every ``nn.Linear`` in the decoder layers (q, k, v, o, gate, up,
down); ``M_head``: the LM head's weights (used once per prefill sequence, since only the
last position's logits are computed; once per token in decode); ``A`` = sum over layers
of (query heads x head_dim), the width of Q K^T and of attention x V; ``P`` = prompt_len,
``N`` = new_tokens. ``4 * A * ctx`` is Q K^T plus attention x V over ``ctx`` keys; with
causal masking a prompt token sees ``(P + 1) / 2`` keys on average and decode step ``i``
(1..N) sees ``P + i``. The embedding lookup is not a matmul and counts nothing.

``flops_ratio`` = model FLOPs / baseline FLOPs (below 1 for a pruned model); the ideal
speedup is ``1 / flops_ratio``; ``efficiency`` = measured speedup / ideal speedup
= measured speedup * flops_ratio (1.0 = speed scales exactly with FLOPs).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from gqaprune.errors import GQAPruneError
from gqaprune.options import opt
from gqaprune.sysmem import release_freed_memory

log = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    """Options of ``gqaprune bench``."""

    models: list[str] = opt(help="model references to compare (folder, hub id, .gguf, alias); the first is "
                                 "the baseline", factory=list)
    prompt_len: int = opt(512, "prompt tokens per sequence (random ids) for the prefill")
    new_tokens: int = opt(128, "tokens decoded greedily per sequence after the prompt, with KV cache")
    batch_sizes: list[int] = opt(help="batch sizes to measure", factory=lambda: [1, 16])
    repeats: int = opt(5, "timed runs per model and batch size; the median is reported")
    warmup: int = opt(1, "untimed runs per model and batch size before timing (the last one measures memory)")
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda when available)")
    dtype: str | None = opt(None, "fp32, bf16 or fp16 (default: bf16 on GPUs that support it, else fp32)")
    threads: int | None = opt(None, "CPU threads for torch (default: torch's own choice)")
    attn_implementation: str | None = opt(None, "attention kernel to load models with (sdpa, eager, ...)")
    seed: int = opt(0, "seed of the random prompt token ids")
    output: str | None = opt(None, "write the results to OUT.json and OUT.md (give either suffix)")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formula needs to know about a model."""

    params: int               # all parameters (tied embeddings counted once)
    layer_matmul_params: int  # weights of the decoder layers' nn.Linear modules
    head_matmul_params: int   # the LM head's weights
    attn_width: int           # sum over layers of query heads * head_dim
    n_layers: int

    def flops_per_token(self, phase: str, prompt_len: int, new_tokens: int) -> float:
        """Analytical FLOPs per processed token for ``phase`` = prefill | decode (module docstring)."""
        p, n = prompt_len, new_tokens
        if phase == "prefill":
            return 2 * self.layer_matmul_params + 2 * self.head_matmul_params / p + 4 * self.attn_width * (p + 1) / 2
        if phase == "decode":
            return 2 * self.layer_matmul_params + 2 * self.head_matmul_params + 4 * self.attn_width * (p + (n + 1) / 2)
        raise ValueError(f"phase must be prefill or decode, got {phase!r}")


def model_shape(model: torch.nn.Module) -> ModelShape:
    """Count the matmul weights and attention width of a Llama-style causal LM (plain or per-layer)."""
    layers = _decoder_layers(model)
    layer_mm = 0
    attn_width = 0
    for layer in layers:
        layer_mm += sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        # q_proj's output is (query heads * head_dim) wide, whatever the layer kept.
        attn_width += layer.self_attn.q_proj.out_features
    head = model.get_output_embeddings()
    head_mm = head.weight.numel() if head is not None else 0
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return ModelShape(params, layer_mm, head_mm, attn_width, len(layers))


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not len(layers) or not hasattr(layers[0], "self_attn"):
        raise GQAPruneError(
            f"bench: {type(model).__name__} does not look like a Llama-style causal LM (no model.layers[i].self_attn); "
            "gqaprune bench measures Llama-architecture models."
        )
    return layers


@dataclass
class BenchRow:
    """One model at one batch size. Times in seconds, memory in bytes."""

    model: str
    batch: int
    prompt_len: int
    new_tokens: int
    params: int
    weights_bytes: int
    prefill_s: float                 # median over repeats
    decode_s: float                  # median over repeats, for new_tokens steps
    prefill_tok_s: float
    decode_tok_s: float
    peak_mem_bytes: int              # weights + peak_extra_bytes
    peak_extra_bytes: int            # activations, KV cache, logits, workspace
    mem_method: str
    flops_prefill_per_token: float
    flops_decode_per_token: float
    flops_ratio_prefill: float = 1.0  # model / baseline
    flops_ratio_decode: float = 1.0
    prefill_speedup: float = 1.0      # model tok/s / baseline tok/s
    decode_speedup: float = 1.0
    prefill_efficiency: float = 1.0   # prefill_speedup * flops_ratio_prefill
    decode_efficiency: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"
    prefill_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any]

    def to_markdown(self) -> str:
        return to_markdown(self.rows, self.meta)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def save(self, output: str | Path) -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.md``; returns both paths."""
        out = Path(output)
        stem = out.with_suffix("") if out.suffix.lower() in (".json", ".md") else out
        stem.parent.mkdir(parents=True, exist_ok=True)
        jpath, mpath = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
        jpath.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        mpath.write_text(self.to_markdown())
        return jpath, mpath


# ----------------------------------------------------------------------------- measuring


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed past_key_values -> cache (the old name is deprecated).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def run_once(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """One prefill + greedy decode; returns (prefill seconds, decode seconds, new token ids [batch, new_tokens + 1])."""
    dev = input_ids.device
    cache = _new_cache(model)
    kw = _cache_kwarg(model)
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    t1 = time.perf_counter()
    toks = [nxt]
    for _ in range(new_tokens):
        # The DynamicCache is updated in place; positions follow from its length.
        out = model(input_ids=nxt, use_cache=True, **{kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    _sync(dev)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, dim=1)


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset Linux's peak-RSS counter (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the reset took effect


class _RssSampler:
    """Fallback: poll RSS in a thread (misses spikes shorter than the interval)."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.proc.memory_info().rss)


def measure_peak_extra(fn, dev: torch.device) -> tuple[int, str]:
    """Run ``fn()``; return (peak bytes above what was in use before it, method used)."""
    if dev.type == "cuda":
        _sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        _sync(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - base), "cuda max_memory_allocated"
    import gc

    gc.collect()
    release_freed_memory()
    if _reset_hwm():
        base = _proc_status_kib("VmRSS") * 1024
        fn()
        return max(0, _proc_status_kib("VmHWM") * 1024 - base), "cpu peak RSS (VmHWM)"
    sampler = _RssSampler()
    base = sampler.peak
    fn()
    return max(0, sampler.stop() - base), "cpu peak RSS (psutil sampled 1 ms)"


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _weights_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _check_options(opts: BenchOptions) -> None:
    if opts.prompt_len < 1:
        raise GQAPruneError(f"--prompt-len {opts.prompt_len}: must be at least 1 token")
    if opts.new_tokens < 1:
        raise GQAPruneError(f"--new-tokens {opts.new_tokens}: must be at least 1 token")
    if not opts.batch_sizes or any(b < 1 for b in opts.batch_sizes):
        raise GQAPruneError(f"--batch-sizes {opts.batch_sizes}: give one or more batch sizes >= 1, e.g. 1,16")
    if opts.repeats < 1:
        raise GQAPruneError(f"--repeats {opts.repeats}: must be at least 1 (5 or more for a stable median)")
    if opts.warmup < 1:
        raise GQAPruneError(f"--warmup {opts.warmup}: must be at least 1 (the last warm-up run measures memory)")


def bench_models(named_models: Iterable[tuple[str, torch.nn.Module]], opts: BenchOptions) -> BenchResult:
    """Measure already-loaded models; the first is the baseline. Each runs on its own device and dtype.

    ``opts.models``, ``device``, ``dtype``, ``attn_implementation`` and ``output`` are not used here
    (see :func:`bench`); the measurement options are.
    """
    from tqdm.auto import tqdm

    _check_options(opts)
    named = list(named_models)
    if not named:
        raise GQAPruneError("bench: no models given; pass one or more model references, the first is the baseline")
    names = _unique_names([n for n, _ in named])
    models = [m.eval() for _, m in named]
    if opts.threads:
        torch.set_num_threads(opts.threads)
    shapes = [model_shape(m) for m in models]
    for name, m in zip(names, models):
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit and opts.prompt_len + opts.new_tokens > limit:
            log.warning("%s: prompt_len + new_tokens = %d exceeds max_position_embeddings %d",
                        name, opts.prompt_len + opts.new_tokens, limit)
    vocab = min(int(m.config.vocab_size) for m in models)  # same ids for every model

    # One short throwaway run per model first, so that one-time process set-up (thread pools,
    # kernel caches, lazy CUDA init) lands in no model's timing or memory figure.
    for m in models:
        dev, _ = _model_device_dtype(m)
        run_once(m, torch.zeros(1, min(opts.prompt_len, 8), dtype=torch.long, device=dev), 1)

    rows: list[BenchRow] = []
    total = len(opts.batch_sizes) * len(models) * (opts.warmup + opts.repeats)
    bar = tqdm(total=total, desc="bench", unit="run", leave=False, disable=None)  # silent when not a terminal
    try:
        for batch in opts.batch_sizes:
            log.info("batch %d: %d warm-up + %d timed runs of %d model(s), prompt %d, %d new tokens",
                     batch, opts.warmup, opts.repeats, len(models), opts.prompt_len, opts.new_tokens)
            gen = torch.Generator().manual_seed(opts.seed)
            ids_cpu = torch.randint(0, vocab, (batch, opts.prompt_len), generator=gen)
            ids = {}
            peak = {}
            for name, m in zip(names, models):
                dev, _ = _model_device_dtype(m)
                ids[name] = ids_cpu.to(dev)
                for _ in range(opts.warmup - 1):
                    run_once(m, ids[name], opts.new_tokens)
                    bar.update()
                peak[name] = measure_peak_extra(lambda: run_once(m, ids[name], opts.new_tokens), dev)
                bar.update()
            times = {name: ([], []) for name in names}
            for _ in range(opts.repeats):
                for name, m in zip(names, models):
                    t_pre, t_dec, _ = run_once(m, ids[name], opts.new_tokens)
                    times[name][0].append(t_pre)
                    times[name][1].append(t_dec)
                    bar.update()
            for name, m, shape in zip(names, models, shapes):
                dev, dt = _model_device_dtype(m)
                pre, dec = times[name]
                t_pre, t_dec = statistics.median(pre), statistics.median(dec)
                wbytes = _weights_bytes(m)
                extra, method = peak[name]
                row = BenchRow(
                    model=name, batch=batch, prompt_len=opts.prompt_len, new_tokens=opts.new_tokens,
                    params=shape.params, weights_bytes=wbytes,
                    prefill_s=t_pre, decode_s=t_dec,
                    prefill_tok_s=batch * opts.prompt_len / t_pre,
                    decode_tok_s=batch * opts.new_tokens / t_dec,
                    peak_mem_bytes=wbytes + extra, peak_extra_bytes=extra, mem_method=method,
                    flops_prefill_per_token=shape.flops_per_token("prefill", opts.prompt_len, opts.new_tokens),
                    flops_decode_per_token=shape.flops_per_token("decode", opts.prompt_len, opts.new_tokens),
                    device=str(dev), dtype=str(dt).replace("torch.", ""),
                    prefill_times=pre, decode_times=dec,
                )
                log.info("%s batch %d: prefill %.1f tok/s, decode %.1f tok/s, peak %.1f MiB (%s)",
                         name, batch, row.prefill_tok_s, row.decode_tok_s, row.peak_mem_bytes / 2**20, method)
                rows.append(row)
    finally:
        bar.close()
    _fill_ratios(rows, names[0])
    return BenchResult(rows, _meta(opts, names, models))


def _unique_names(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def _fill_ratios(rows: list[BenchRow], baseline: str) -> None:
    base = {r.batch: r for r in rows if r.model == baseline}
    for r in rows:
        b = base[r.batch]
        r.flops_ratio_prefill = r.flops_prefill_per_token / b.flops_prefill_per_token
        r.flops_ratio_decode = r.flops_decode_per_token / b.flops_decode_per_token
        r.prefill_speedup = r.prefill_tok_s / b.prefill_tok_s
        r.decode_speedup = r.decode_tok_s / b.decode_tok_s
        r.prefill_efficiency = r.prefill_speedup * r.flops_ratio_prefill
        r.decode_efficiency = r.decode_speedup * r.flops_ratio_decode


def _meta(opts: BenchOptions, names: list[str], models: list) -> dict[str, Any]:
    import transformers

    dev, dt = _model_device_dtype(models[0])
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "baseline": names[0],
        "models": names,
        "prompt_len": opts.prompt_len,
        "new_tokens": opts.new_tokens,
        "batch_sizes": list(opts.batch_sizes),
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "seed": opts.seed,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "timing": "median of repeats; prefill = one forward over batch x prompt_len (logits_to_keep=1); "
                  "decode = new_tokens greedy single-token steps with KV cache, timed apart from the prefill",
        "flops_formula": "prefill = 2*M_layers + 2*M_head/P + 4*A*(P+1)/2; decode = 2*M_layers + 2*M_head + "
                         "4*A*(P+(N+1)/2); M = matmul weights, A = sum over layers of q_heads*head_dim",
    }
    if dev.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(dev)
    return meta


def bench(opts: BenchOptions) -> BenchResult:
    """Load ``opts.models`` (the first is the baseline), measure them, and save if ``opts.output`` is set."""
    from gqaprune.model_io import load_model

    if not opts.models:
        raise GQAPruneError("--models: none given; pass one or more model references (the first is the baseline), "
                            "e.g. --models smollm2-135m,out/pruned")
    _check_options(opts)
    named = []
    for ref in opts.models:
        kw = {"dtype": opts.dtype, "device": opts.device, "with_tokenizer": False}
        if opts.attn_implementation:
            kw["attn_implementation"] = opts.attn_implementation
        model, _ = load_model(ref, **kw)
        named.append((ref, model))
    result = bench_models(named, opts)
    if opts.output:
        jpath, mpath = result.save(opts.output)
        log.info("wrote %s and %s", jpath, mpath)
    return result


# ----------------------------------------------------------------------------- formatting


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def to_markdown(rows: Sequence[BenchRow], meta: dict[str, Any] | None = None) -> str:
    """A Markdown table of the rows (speedups and FLOPs ratios relative to the first model), with notes."""
    lines = []
    if meta:
        where = meta.get("gpu") or f"{meta.get('processor')}, {meta.get('cpu_threads')} threads"
        lines.append(
            f"Device {meta.get('device')} ({where}), {meta.get('dtype')}; prompt {meta.get('prompt_len')} tokens, "
            f"{meta.get('new_tokens')} new tokens; median of {meta.get('repeats')} runs after "
            f"{meta.get('warmup')} warm-up; torch {meta.get('torch')}, transformers {meta.get('transformers')}; "
            f"{meta.get('date')}. Baseline: {meta.get('baseline')}."
        )
        lines.append("")
    header = ["model", "params", "batch", "prefill tok/s", "decode tok/s", "peak mem",
              "FLOPs ratio prefill", "FLOPs ratio decode", "prefill speedup", "decode speedup",
              "prefill speedup / FLOPs speedup", "decode speedup / FLOPs speedup"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for r in sorted(rows, key=lambda r: r.batch):
        cells = [r.model, _fmt_count(r.params), str(r.batch), _fmt_rate(r.prefill_tok_s), _fmt_rate(r.decode_tok_s),
                 _fmt_bytes(r.peak_mem_bytes), f"{r.flops_ratio_prefill:.3f}", f"{r.flops_ratio_decode:.3f}",
                 f"{r.prefill_speedup:.2f}x", f"{r.decode_speedup:.2f}x",
                 f"{r.prefill_efficiency:.2f}", f"{r.decode_efficiency:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    methods = sorted({r.mem_method for r in rows})
    lines += [
        "",
        "FLOPs ratio = analytical FLOPs per token of the model / the baseline's "
        "(prefill = 2·M_layers + 2·M_head/P + 4·A·(P+1)/2; decode = 2·M_layers + 2·M_head + 4·A·(P+(N+1)/2); "
        "M = matmul weights, A = Σ layers query heads × head_dim). "
        "FLOPs speedup = 1 / FLOPs ratio; the last two columns are 1.00 when speed scales exactly with FLOPs.",
        f"Peak mem = the model's weights + peak extra memory of one prefill + decode run ({', '.join(methods)}).",
        "",
    ]
    return "\n".join(lines)
