"""Memory probes, the one home: peak RSS, peak extra memory of a call, memory available, heap trimming.

Used by calibration and pruning (peak RSS in the summary), the speed benchmark (peak extra
memory of one prefill + decode) and ``gqaprune check`` (does LoRA fine-tuning fit?).
CPU numbers are Linux/glibc aware; elsewhere they fall back to psutil.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
import threading
import time

import torch


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_memory() -> None:
    """Hand heap pages already freed back to the OS (a no-op off glibc).

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so
    per-batch activations and logits ratchet the RSS up batch after batch; trimming after
    every calibration batch keeps the peak near the weights plus one batch's activations
    (benchmarks/results/prune_memory_smollm2.md).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by this process since the last reset (MiB), None without CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def reset_gpu_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def available_memory(device: str | None) -> tuple[int, str]:
    """(bytes, description): the GPU's total memory when one is used, else the RAM available now."""
    import psutil

    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        _free, total = torch.cuda.mem_get_info()
        return total, f"GPU {torch.cuda.get_device_name()} ({total / 2**30:.1f} GiB)"
    return psutil.virtual_memory().available, "CPU RAM available (no GPU)"


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
    """Run ``fn()``; return (peak bytes above what was in use before it, method used).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
    allocated before. CPU: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
    minus the RSS before, after freed heap went back to the OS; where the reset is not
    possible, RSS sampled every millisecond.
    """
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - base), "cuda max_memory_allocated"
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
