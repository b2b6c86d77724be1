"""datasets: offline mode for a block, also where ``datasets.config`` has already read its setting.

Targets datasets 3.x-5.x: ``datasets.config.HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are read
once at import, so without this a local-file task loaded through ``load_dataset("json", ...)``
still checks the Hub first.
"""

from __future__ import annotations

import contextlib

from gqaprune.compat.huggingface_hub import patched_constants

TARGET = "datasets>=3.0 (config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE)"


def offline() -> contextlib.AbstractContextManager:
    return patched_constants("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
                             ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
