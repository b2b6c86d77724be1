"""Knowledge distillation for ``--distill_from``: the KL term and the frozen teacher.

The loss the trainer minimises is ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM loss``,
both terms per loss token, both distributions softmax(logits / T). The T^2 factor (Hinton et
al.) keeps the KL gradient's scale independent of T; it is applied by the caller.
"""

from __future__ import annotations

import torch

from gqaprune.errors import GQAPruneError


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, int]:
    """(sum over loss tokens of KL(teacher || student) at temperature T, number of those tokens).

    ``*_logits``: ``[batch, seq, vocab]``; ``labels``: ``[batch, seq]``. The tokens are the
    causal-LM loss's: logits at position i predict label i + 1, and only positions whose next
    label is not -100 count. Both distributions are softmax(logits / T), computed in fp32 on
    the selected positions only (a ``[tokens, vocab]`` copy, not ``[batch, seq, vocab]``).
    Hinton's T^2 factor is NOT applied here; the caller scales the term.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise GQAPruneError(f"--distill_from: the teacher predicts {teacher_logits.shape[-1]} tokens, the student "
                            f"{student_logits.shape[-1]}; teacher and student must share one vocabulary")
    keep = labels[..., 1:] != -100
    n = int(keep.sum())
    if n == 0:
        return student_logits.sum() * 0.0, 0
    return kl_sum(student_logits[..., :-1, :][keep], teacher_logits[..., :-1, :][keep], temperature), n


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) || softmax(student / T)), in fp32; both ``[rows, vocab]``,
    one row per loss position."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return torch.nn.functional.kl_div(s, t, reduction="sum", log_target=True)


_kl_sum = kl_sum   # the name earlier versions used


def load_teacher(ref: str, student_tokenizer, student_config, *, dtype: torch.dtype, device: torch.device,
                 allow_pickle: bool = False):
    """The frozen teacher for --distill_from, in eval mode, in the student's precision, on its device.

    Refuses a teacher whose vocabulary (tokenizer and output size) differs from the student's:
    the KL compares the two distributions token id by token id.
    """
    from gqaprune.models.io import load_model

    teacher, ttok = load_model(ref, dtype=dtype, device=device, allow_pickle=allow_pickle, flag="--distill_from")
    if ttok is not None and ttok.get_vocab() != student_tokenizer.get_vocab():
        raise GQAPruneError(
            f"--distill_from {ref}: its tokenizer differs from the student's ({len(ttok)} vs "
            f"{len(student_tokenizer)} tokens, or different ids); distillation compares token distributions id by "
            "id, so use a teacher with the student's tokenizer (the model it was pruned from)."
        )
    tv, sv = teacher.config.get_text_config().vocab_size, student_config.get_text_config().vocab_size
    if tv != sv:
        raise GQAPruneError(f"--distill_from {ref}: vocabulary size {tv}, the student's is {sv}; use the model the "
                            "student was pruned from")
    teacher.eval().requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


__all__ = ["distillation_kl", "kl_sum", "load_teacher"]
