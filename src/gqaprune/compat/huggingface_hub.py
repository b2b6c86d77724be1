"""huggingface_hub: offline mode for a block, also where the library has already read its setting.

Targets huggingface_hub 0.2x-2.x: ``huggingface_hub.constants.HF_HUB_OFFLINE`` is read from the
environment once, at import. Setting ``HF_HUB_OFFLINE=1`` later changes nothing for an
imported hub: without this, lm-eval's dataset loading would still try the network (and wait
for its time-outs) when the tasks read local files. ``offline()`` sets the variable and the
imported constant for the block, and restores both.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

TARGET = "huggingface_hub>=0.20 (constants.HF_HUB_OFFLINE)"


@contextlib.contextmanager
def patched_constants(module: str, attrs: tuple[str, ...], env: tuple[str, ...]) -> Iterator[None]:
    """Set ``env`` variables to "1" and ``module.attr`` to True (if imported) for the block; restore after."""
    old_env = {k: os.environ.get(k) for k in env}
    mod = sys.modules.get(module)
    old = {a: getattr(mod, a) for a in attrs if mod is not None and hasattr(mod, a)}
    try:
        for k in env:
            os.environ[k] = "1"
        for a in old:
            setattr(mod, a, True)
        yield
    finally:
        for a, v in old.items():
            setattr(mod, a, v)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def offline() -> contextlib.AbstractContextManager:
    return patched_constants("huggingface_hub.constants", ("HF_HUB_OFFLINE",), ("HF_HUB_OFFLINE",))
