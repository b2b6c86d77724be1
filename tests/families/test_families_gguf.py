"""Every family llama.cpp knows, exported to GGUF (f32) and run in llama.cpp: its logits equal transformers'.

Uniform checkpoints of all seven families; per-layer ones of the families written as llama.cpp's ``deci``
(those whose math is Llama's); per-layer Qwen3 / Gemma are refused with the alternative named.
Skipped, with the reason, where llama-cpp-python is not installed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from gqaprune.cli import main
from gqaprune.export.gguf import ARCHS
from gqaprune.models.family import FAMILIES
from gqaprune.models.io import save_checkpoint
from gqaprune.models.layout import model_layout
from gqaprune.prune.surgery import apply_plan
from helpers import FAMILY_CONFIGS, make_family_model, make_tokenizer
from test_families import CUTS, plan_removing

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

IDS = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()


def _pruned(family, kind, tmp_path):
    # Mistral's sliding window is not written (llama.cpp's llama arch has none): test within the window
    model = make_family_model(family, **({"sliding_window": 64} if family == "mistral" else {}))
    pruned = apply_plan(copy.deepcopy(model), plan_removing(model_layout(model), *CUTS[kind], kind))
    # a folder name without the family's: llama.cpp's vocabulary loader reads Phi-3's special tokens by name
    # when general.name mentions phi3, and this tiny tokenizer has none
    return save_checkpoint(pruned, make_tokenizer(), tmp_path / f"m-{kind}"), pruned


@pytest.mark.parametrize("kind", ["uniform", "per-layer"])
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_llama_cpp_logits_equal_transformers(family, kind, tmp_path, capsys):
    from gqaprune.bench import llamacpp

    folder, pruned = _pruned(family, kind, tmp_path)
    out = tmp_path / "m.gguf"
    rc = main(["export", str(folder), "--output", str(out), "--outtype", "f32"])
    if kind == "per-layer" and ARCHS[family].per_layer is None:
        assert rc == 2 and not out.exists()
        assert "--layout uniform" in capsys.readouterr().err
        return
    assert rc == 0
    with torch.no_grad():
        ref = pruned(input_ids=torch.tensor([IDS])).logits[0].numpy()
    llm = llamacpp.load(out, n_ctx=64)
    got = llamacpp.logits(llm, IDS)
    llm.close()
    # Gemma's GELU: ggml's CPU kernel reads it from an f16 table, which moves these logits by ~2e-4 (SiLU is exact)
    tol = 1e-3 if family.startswith("gemma") else 1e-4
    assert np.abs(got - ref).max() <= tol, (FAMILIES[family].label, np.abs(got - ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()
