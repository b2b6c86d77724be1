"""llama-cpp-python: load a GGUF without llama.cpp's AMX weight buffers on CPUs that have AMX.

Targets llama-cpp-python 0.3.36 (llama.cpp's ``llama_model_params.use_extra_bufts``, the switch behind
llama.cpp's ``--no-repack`` / ``-nr``). On a CPU with AMX (Intel Sapphire Rapids and later) llama.cpp built
natively repacks quantized weights (q8_0, Q4_K_M, ...) into an AMX buffer, and its matmul there
segfaults on our models (ggml-org/llama.cpp#20824, open; reproduced here on a 2-core Xeon with
amx_int8: the tiny test models' q8_0 and Q4_K_M files crash the process, f32/f16 run). Without the
extra buffer types the same files run on the ordinary CPU kernels. ``Llama()`` takes no argument for
the field, so ``no_extra_buffers()`` swaps in default model params that have it off, for one load.
Elsewhere (no AMX) nothing changes: the repacked buffers there are llama.cpp's fast path.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

TARGET = "llama-cpp-python 0.3.36 (llama_model_params.use_extra_bufts)"


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether the CPU reports AMX (the amx_int8 / amx_tile flags of /proc/cpuinfo; False where unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return "amx_int8" in flags or "amx_tile" in flags


def repack_off() -> bool:
    """Whether gqaprune loads GGUFs with llama.cpp's extra buffer types off on this machine (an AMX CPU);
    ``gqaprune bench`` records it, since it changes quantized files' speed."""
    return cpu_has_amx()


@contextlib.contextmanager
def no_extra_buffers(enabled: bool | None = None):
    """Within the block, ``llama_cpp.Llama(...)`` loads with ``use_extra_bufts = False``; ``enabled`` None:
    ``repack_off()``. A llama-cpp-python without the field is left alone (said in the log)."""
    import llama_cpp.llama as llama_py   # the module whose ``llama_cpp`` name Llama.__init__ calls through

    if enabled is None:
        enabled = repack_off()
    lib = llama_py.llama_cpp
    orig = lib.llama_model_default_params
    if not enabled or "use_extra_bufts" not in {f[0] for f in lib.llama_model_params._fields_}:
        if enabled:
            log.warning("llama-cpp-python has no use_extra_bufts (targets %s); loading with AMX buffers", TARGET)
        yield False
        return

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield True
    finally:
        lib.llama_model_default_params = orig
