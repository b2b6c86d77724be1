"""Wrap the student in a PEFT LoRA adapter (or, with --full_finetune, train all of it).

LoRA on per-layer pruned models needs no patching: PEFT wraps each ``nn.Linear`` on its own,
and the per-layer model derives head counts from projection widths.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)


def linear_module_names(model) -> list[str]:
    """Leaf names of every nn.Linear in the model (what --lora_target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def family_targets(model, targets: list[str]) -> list[str]:
    """``targets``, with the seed's default names (q/k/v/o/gate/up/down_proj) read as the model family's own
    projections where the family fuses them (Phi-3: qkv_proj, gate_up_proj)."""
    from gqaprune.models.family import family_for_type
    from gqaprune.recover.options import DEFAULT_TARGET_MODULES

    fam = family_for_type(getattr(model.config, "model_type", None))
    if fam is not None and sorted(targets) == sorted(DEFAULT_TARGET_MODULES) \
            and sorted(fam.lora_targets) != sorted(targets):
        log.info("LoRA targets: %s's projections %s for the default names", fam.label, ",".join(fam.lora_targets))
        return list(fam.lora_targets)
    return list(targets)


def check_target_modules(model, targets: list[str]) -> None:
    if list(targets) == ["all-linear"]:
        return  # PEFT's shorthand: every Linear except the output head
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise GQAPruneError(
            f"--lora_target_modules: {', '.join(missing)} matches no Linear module of this model; the Linear "
            f"modules are: {', '.join(linear_module_names(model))}."
        )


def wrap_lora(model, opts):
    """The PeftModel with a fresh LoRA adapter (A initialised from ``opts.seed``), the base recorded by path."""
    import transformers
    from peft import LoraConfig

    from gqaprune.compat.peft import get_peft_model

    transformers.set_seed(opts.seed)  # LoRA A init
    cfg = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                     target_modules="all-linear" if opts.all_linear else list(opts.lora_target_modules),
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    p = Path(opts.prune_model).expanduser()
    model.peft_config["default"].base_model_name_or_path = str(p.resolve()) if p.exists() else opts.prune_model
    n_train = sum(q.numel() for q in model.parameters() if q.requires_grad)
    n_all = sum(q.numel() for q in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)", opts.lora_r, opts.lora_alpha,
             ",".join(opts.lora_target_modules), f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(1, n_all))
    return model


def full_parameters(model, opts):
    """--full_finetune: the model itself, every parameter trainable (seeded like ``wrap_lora`` for the data order)."""
    import transformers

    transformers.set_seed(opts.seed)
    for q in model.parameters():
        q.requires_grad_(True)
    n_all = sum(q.numel() for q in model.parameters())
    log.info("full fine-tuning: all %s parameters trainable (the --lora_* options are unused)", f"{n_all:,}")
    return model


__all__ = ["check_target_modules", "full_parameters", "linear_module_names", "wrap_lora"]
