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

FLOPs: bench/flops.py; timing: bench/timing.py; memory: gqaprune/memory.py; the table: bench/markdown.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import torch

from gqaprune.bench.flops import model_shape
from gqaprune.bench.markdown import to_markdown
from gqaprune.bench.timing import run_once
from gqaprune.errors import GQAPruneError
from gqaprune.memory import measure_peak_extra
from gqaprune.options import ModelArgs, opt

log = logging.getLogger(__name__)

ENGINES = ("hf", "llama.cpp")


@dataclass
class BenchOptions(ModelArgs):
    """Options of ``gqaprune bench``."""

    models: list[str] = opt(help="model references to compare (folder, hub id, .gguf, alias); the first is "
                                 "the baseline", factory=list)
    prompt_len: int = opt(512, "prompt tokens per sequence (random ids) for the prefill")
    new_tokens: int = opt(128, "tokens decoded greedily per sequence after the prompt, with KV cache")
    batch_sizes: list[int] = opt(help="batch sizes to measure", factory=lambda: [1, 16])
    repeats: int = opt(5, "timed runs per model and batch size; the median is reported")
    warmup: int = opt(1, "untimed runs per model and batch size before timing (the last one measures memory)")
    engine: str = opt("hf", "hf: transformers models (any reference); llama.cpp: .gguf files through "
                      "llama-cpp-python, batch 1", choices=ENGINES)
    threads: int | None = opt(None, "CPU threads (torch's, or llama.cpp's; default: torch's own choice / all cores)")
    attn_implementation: str | None = opt(None, "attention kernel to load models with (sdpa, eager, ...)")
    seed: int = opt(0, "seed of the random prompt token ids")
    output: str | None = opt(None, "write the results to OUT.json and OUT.md (give either suffix)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_len < 1:
            raise GQAPruneError(f"--prompt-len {self.prompt_len}: must be at least 1 token")
        if self.new_tokens < 1:
            raise GQAPruneError(f"--new-tokens {self.new_tokens}: must be at least 1 token")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise GQAPruneError(f"--batch-sizes {self.batch_sizes}: give one or more batch sizes >= 1, e.g. 1,16")
        if self.repeats < 1:
            raise GQAPruneError(f"--repeats {self.repeats}: must be at least 1 (5 or more for a stable median)")
        if self.warmup < 1:
            raise GQAPruneError(f"--warmup {self.warmup}: must be at least 1 (the last warm-up run measures memory)")
        if self.threads is not None and self.threads < 1:
            raise GQAPruneError(f"--threads {self.threads}: must be at least 1")
        if self.engine == "llama.cpp":
            if self.batch_sizes != [1]:
                raise GQAPruneError(f"--batch-sizes {self.batch_sizes}: the llama.cpp engine measures batch 1 "
                                    "(one sequence, as a chat server runs it); pass --batch-sizes 1")
            bad = [m for m in self.models if not str(m).endswith(".gguf")]
            if bad:
                raise GQAPruneError(f"--models {','.join(bad)}: the llama.cpp engine takes .gguf files; make them "
                                    "with gqaprune export")


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
    peak_mem_bytes: int              # weights + peak_extra_bytes (llama.cpp: weights only, extra not measured)
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
    bytes_ratio: float = 1.0          # weight bytes / baseline's: the bound of a memory-bound decode's speedup
    decode_bytes_efficiency: float = 1.0   # decode_speedup * bytes_ratio (1.0 = decode scales with bytes read)
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


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use ``n`` CPU threads for the block (None: leave torch's setting), restored afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_positions(names, models, opts: BenchOptions) -> None:
    """Refuse a prompt + decode longer than a model's positions: its numbers would measure nothing real."""
    for name, m in zip(names, models):
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit and opts.prompt_len + opts.new_tokens > limit:
            raise GQAPruneError(f"--prompt-len {opts.prompt_len} + --new-tokens {opts.new_tokens} = "
                                f"{opts.prompt_len + opts.new_tokens} tokens, but {name} has {limit} positions "
                                "(max_position_embeddings); lower them.")


def _measure_batch(batch: int, names, models, vocab: int, opts: BenchOptions, bar) -> dict:
    """name -> (peak extra memory, method, prefill times, decode times) at one batch size.

    The warm-up runs come first (the last one measures memory), then the timed runs round-robin
    over the models, so a slow phase of a shared machine hits every model alike.
    """
    gen = torch.Generator().manual_seed(opts.seed)
    ids_cpu = torch.randint(0, vocab, (batch, opts.prompt_len), generator=gen)
    ids, peak = {}, {}
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
    return {name: (*peak[name], *times[name]) for name in names}


def _row(name: str, m, shape, batch: int, measured, opts: BenchOptions, *, device: str | None = None,
         dtype: str | None = None, wbytes: int | None = None) -> BenchRow:
    extra, method, pre, dec = measured
    if m is not None:
        dev, dt = _model_device_dtype(m)
        device, dtype, wbytes = str(dev), str(dt).replace("torch.", ""), _weights_bytes(m)
    t_pre, t_dec = statistics.median(pre), statistics.median(dec)
    return BenchRow(
        model=name, batch=batch, prompt_len=opts.prompt_len, new_tokens=opts.new_tokens,
        params=shape.params, weights_bytes=wbytes, prefill_s=t_pre, decode_s=t_dec,
        prefill_tok_s=batch * opts.prompt_len / t_pre, decode_tok_s=batch * opts.new_tokens / t_dec,
        peak_mem_bytes=wbytes + extra, peak_extra_bytes=extra, mem_method=method,
        flops_prefill_per_token=shape.flops_per_token("prefill", opts.prompt_len, opts.new_tokens),
        flops_decode_per_token=shape.flops_per_token("decode", opts.prompt_len, opts.new_tokens),
        device=device, dtype=dtype, prefill_times=pre, decode_times=dec)


def bench_models(named_models: Iterable[tuple[str, torch.nn.Module]], opts: BenchOptions) -> BenchResult:
    """Measure already-loaded models; the first is the baseline. Each runs on its own device and dtype.

    ``opts.models``, ``device``, ``dtype``, ``attn_implementation`` and ``output`` are not used here
    (see :func:`bench`); the measurement options are.
    """
    from tqdm.auto import tqdm

    named = list(named_models)
    if not named:
        raise GQAPruneError("bench: no models given; pass one or more model references, the first is the baseline")
    names = _unique_names([n for n, _ in named])
    models = [m.eval() for _, m in named]
    shapes = [model_shape(m) for m in models]
    _check_positions(names, models, opts)
    vocab = min(int(m.config.vocab_size) for m in models)  # same ids for every model
    rows: list[BenchRow] = []
    with torch_threads(opts.threads):
        # One short throwaway run per model first, so that one-time process set-up (thread pools,
        # kernel caches, lazy CUDA init) lands in no model's timing or memory figure.
        for m in models:
            run_once(m, torch.zeros(1, min(opts.prompt_len, 8), dtype=torch.long, device=_model_device_dtype(m)[0]), 1)
        total = len(opts.batch_sizes) * len(models) * (opts.warmup + opts.repeats)
        with tqdm(total=total, desc="bench", unit="run", leave=False, disable=None) as bar:  # silent off a terminal
            for batch in opts.batch_sizes:
                log.info("batch %d: %d warm-up + %d timed runs of %d model(s), prompt %d, %d new tokens",
                         batch, opts.warmup, opts.repeats, len(models), opts.prompt_len, opts.new_tokens)
                measured = _measure_batch(batch, names, models, vocab, opts, bar)
                for name, m, shape in zip(names, models, shapes):
                    row = _row(name, m, shape, batch, measured[name], opts)
                    log.info("%s batch %d: prefill %.1f tok/s, decode %.1f tok/s, peak %.1f MiB (%s)", name, batch,
                             row.prefill_tok_s, row.decode_tok_s, row.peak_mem_bytes / 2**20, row.mem_method)
                    rows.append(row)
        meta = _meta(opts, names, models)
    _fill_ratios(rows, names[0])
    return BenchResult(rows, meta)


def bench_gguf(opts: BenchOptions) -> BenchResult:
    """The llama.cpp engine: each GGUF at batch 1, models taking turns per repeat (bench/llamacpp.py)."""
    import llama_cpp

    from gqaprune.bench import llamacpp
    from gqaprune.bench.flops import gguf_shape
    from gqaprune.compat.llama_cpp import repack_off

    names = _unique_names(list(opts.models))
    threads = opts.threads or os.cpu_count() or 1
    llms = [llamacpp.load(m, n_ctx=opts.prompt_len + opts.new_tokens + 8, threads=threads, f32_cache=False,
                          logits_all=False) for m in opts.models]
    runs = [([], []) for _ in llms]
    for rep in range(opts.repeats):
        for (pre, dec), llm in zip(runs, llms):
            s = llamacpp.speed(llm, prompt_len=opts.prompt_len, new_tokens=opts.new_tokens, repeats=1,
                               warmup=opts.warmup if rep == 0 else 0, seed=opts.seed + rep)
            pre += s.prefill_times
            dec += s.decode_times
    for llm in llms:
        llm.close()   # now, not in __del__ at interpreter exit (llama-cpp-python then fails noisily)
    rows = []
    for name, path, (pre, dec) in zip(names, opts.models, runs):
        shape = gguf_shape(path)
        wbytes = _gguf_bytes(path)
        rows.append(_row(name, None, shape, 1, (0, "not measured (llama.cpp engine)", pre, dec), opts,
                         device=f"cpu, llama.cpp {threads} threads", dtype=_gguf_type(path), wbytes=wbytes))
    _fill_ratios(rows, names[0])
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "engine": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_repack": "off (AMX CPU; compat/llama_cpp.py)" if repack_off() else "on", "threads": threads, "baseline": names[0], "models": names,
            "prompt_len": opts.prompt_len, "new_tokens": opts.new_tokens, "batch_sizes": [1], "repeats": opts.repeats,
            "warmup": opts.warmup, "device": "cpu", "processor": platform.processor() or platform.machine(),
            "cpu_threads": threads, "dtype": "per model", "torch": torch.__version__, "transformers": "-"}
    return BenchResult(rows, meta)


def _gguf_bytes(path) -> int:
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(str(path)).tensors))


def _gguf_type(path) -> str:
    from gguf import GGUFReader

    types = {}
    for t in GGUFReader(str(path)).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return max(types, key=types.get)   # the type holding most of the bytes


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
        r.bytes_ratio = r.weights_bytes / b.weights_bytes
        r.decode_bytes_efficiency = r.decode_speedup * r.bytes_ratio


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
    from gqaprune.models.io import load_model, resolve_model_ref

    if not opts.models:
        raise GQAPruneError("--models: none given; pass one or more model references (the first is the baseline), "
                            "e.g. --models smollm2-135m,out/pruned")
    for ref in opts.models:
        resolve_model_ref(ref, "--models")   # every reference is checked before the first is loaded
    if opts.engine == "llama.cpp":
        result = bench_gguf(opts)
        if opts.output:
            result.save(opts.output)
        return result
    named = []
    for ref in opts.models:
        model, _ = load_model(ref, dtype=opts.dtype, device=opts.device, allow_pickle=opts.allow_pickle,
                              attn_implementation=opts.attn_implementation, with_tokenizer=False, flag="--models")
        named.append((ref, model))
    result = bench_models(named, opts)
    if opts.output:
        jpath, mpath = result.save(opts.output)
        log.info("wrote %s and %s", jpath, mpath)
    return result
