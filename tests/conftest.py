"""Shared fixtures (the builders they use are in helpers.py): tiny random Llama models, a tiny tokenizer,
the shared data folder, all offline. Seconds per test, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_tiny_model, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GQAPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def tiny_dir(tmp_path, tiny_model, tokenizer):
    """A tiny dense model saved as a Hugging Face folder."""
    out = tmp_path / "tiny_dense"
    tiny_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}; set GQAPRUNE_DATA_DIR")
    return SHARED_DATA


@pytest.fixture
def data_env(monkeypatch, shared_data):
    monkeypatch.setenv("GQAPRUNE_DATA_DIR", str(shared_data))
    return shared_data


@pytest.fixture
def calib_file(tmp_path):
    """A small local calibration text (so tests don't depend on the shared data)."""
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(400)))
    return p
