"""The perplexity protocol against a direct computation with the model's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from gqaprune.evaluate.perplexity import perplexity_of_ids
from helpers import make_tiny_model


@pytest.mark.parametrize("seq_len,stride,batch", [(16, None, 8), (16, None, 3), (16, 8, 4)])
def test_ppl_equals_the_hf_loss_window_by_window(seq_len, stride, batch):
    model = make_tiny_model().eval()
    ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(0))
    nll, n = perplexity_of_ids(model, ids, seq_len=seq_len, stride=stride, batch_size=batch, progress=False)
    total, count, prev_end = 0.0, 0, 0
    s = stride or seq_len
    with torch.no_grad():
        for b in range(0, ids.numel(), s):
            e = min(b + seq_len, ids.numel())
            if (stride is None and e - b < seq_len) or e - b < 2:
                break
            k = (e - prev_end if prev_end else e - b - 1) if stride else seq_len - 1
            labels = ids[b:e].clone()[None]
            labels[0, : e - b - k] = -100        # score only the last k tokens (HF's sliding-window recipe)
            loss = model(input_ids=ids[None, b:e], labels=labels).loss
            total, count, prev_end = total + float(loss) * k, count + k, e
            if e == ids.numel():
                break
    assert n == count and math.isclose(nll, total / count, rel_tol=1e-5)
