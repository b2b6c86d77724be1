"""``--quantize TYPE``: llama.cpp's own quantizer on an f16/f32 GGUF, through llama-cpp-python.

``llama_model_quantize`` is the function the ``llama-quantize`` tool calls, so the K-quants
(Q4_K_M, Q5_K_M, ...) are llama.cpp's own, with its per-tensor mixes and fallbacks for rows a
block type cannot hold. The result is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from gqaprune.errors import GQAPruneError

INSTALL = ("pip install llama-cpp-python  (builds llama.cpp from source: several minutes on a small CPU; "
           "CMAKE_ARGS=\"-DGGML_CUDA=on\" for a GPU build)")
# --quantize name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* constant
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
         "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")


def check_type(name: str) -> None:
    if name not in TYPES:
        raise GQAPruneError(f"--quantize {name}: unknown; choose one of {', '.join(TYPES)}")


_QUIET = None   # the log callback handed to llama.cpp; kept alive here for as long as llama.cpp may call it


def llama_cpp():
    """The llama_cpp module with llama.cpp's own logging off (it prints every tensor it loads or quantizes to the
    terminal), or a message that says how to install it."""
    global _QUIET
    try:
        import llama_cpp
    except ImportError as e:
        raise GQAPruneError(f"this needs llama-cpp-python, which is not installed ({e}). Install it with: "
                            f"{INSTALL}") from e
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_QUIET, None)
    return llama_cpp


def quantize(src: Path, dst: Path, name: str, threads: int = 0) -> Path:
    """Quantize GGUF ``src`` to ``dst`` as ``name`` (see TYPES) with llama.cpp."""
    check_type(name)
    lc = llama_cpp()
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise GQAPruneError(f"--quantize {name}: this llama-cpp-python build does not offer it; update it "
                            f"({INSTALL})")
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or (os.cpu_count() or 1)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            raise GQAPruneError(f"--quantize {name}: llama.cpp's quantizer failed on {src} (code {rc})")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
