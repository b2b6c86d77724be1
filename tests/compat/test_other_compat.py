"""gqaprune.compat: offline switches, lm-eval's noise, PEFT's warning, Liger's per-kernel report."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

from helpers import make_tiny_model


def test_offline_sets_and_restores_the_imported_constants(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from gqaprune.compat import datasets as dc
    from gqaprune.compat import huggingface_hub as hc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    with hc.offline(), dc.offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_DATASETS_OFFLINE is True
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_DATASETS_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ


def test_lm_eval_quiet_replaces_and_restores_the_git_lookup(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator as ev

    from gqaprune.compat import lm_eval as lc

    assert hasattr(ev, "get_git_commit_hash"), "lm-eval dropped get_git_commit_hash: update compat/lm_eval.py"
    orig = ev.get_git_commit_hash
    monkeypatch.chdir(tmp_path)   # not a git repository
    with lc.quiet():
        assert ev.get_git_commit_hash is lc.quiet_git_hash
        assert ev.get_git_commit_hash() is None
    assert ev.get_git_commit_hash is orig
    assert "not a git repository" not in capfd.readouterr().err


def test_peft_wrapper_raises_no_deprecation_warning():
    from peft import LoraConfig

    from gqaprune.compat.peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        m = get_peft_model(make_tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) > 0


def test_liger_reports_each_kernel_that_failed(monkeypatch):
    """A partly applied patch says which kernels failed; it never reports 'none' after patching some."""
    import types

    from gqaprune.compat import liger

    calls = []

    def fake_apply(model=None, **flags):
        k = next(name for name, on in flags.items() if on)
        calls.append(k)
        if k == "swiglu":
            raise RuntimeError("no kernel for this shape")

    mod = types.ModuleType("liger_kernel.transformers")
    mod.apply_liger_kernel_to_llama = fake_apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", mod)
    rep = liger.apply(object(), distill=False)
    assert rep.startswith("liger (rope, rms_norm, fused_linear_cross_entropy)") and "FAILED: swiglu" in rep
    assert "fused_linear_cross_entropy" not in liger.apply(object(), distill=True)
    monkeypatch.setattr(mod, "apply_liger_kernel_to_llama", lambda **k: (_ for _ in ()).throw(ValueError("x")))
    assert liger.apply(object(), distill=False).startswith("none (every Liger kernel failed")


@pytest.mark.parametrize("mod", ["transformers", "huggingface_hub", "datasets", "lm_eval", "peft", "liger"])
def test_every_compat_module_names_its_target_version(mod):
    import importlib

    m = importlib.import_module(f"gqaprune.compat.{mod}")
    assert m.TARGET and "without" in m.__doc__.lower()   # the version it targets, what breaks without it


def test_llama_cpp_no_extra_buffers_turns_the_field_off_for_the_block_only():
    """The AMX work-around (compat/llama_cpp.py): inside the block Llama() would get default model params
    with use_extra_bufts off; outside, llama.cpp's own default; the CPU test reads /proc/cpuinfo flags."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    import llama_cpp.llama as llama_py

    from gqaprune.compat import llama_cpp as lc

    assert "use_extra_bufts" in {f[0] for f in llama_py.llama_cpp.llama_model_params._fields_}, \
        f"llama-cpp-python dropped use_extra_bufts: update compat/llama_cpp.py (targets {lc.TARGET})"
    default = llama_py.llama_cpp.llama_model_default_params().use_extra_bufts
    assert default is True
    with lc.no_extra_buffers(True) as on:
        assert on and llama_py.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert llama_py.llama_cpp.llama_model_default_params().use_extra_bufts is True
    with lc.no_extra_buffers(False) as on:
        assert not on and llama_py.llama_cpp.llama_model_default_params().use_extra_bufts is True
    assert lc.cpu_has_amx("processor : 0\nflags : fpu avx2 avx512f amx_tile amx_int8\n")
    assert not lc.cpu_has_amx("processor : 0\nflags : fpu avx2 avx512f\n")
