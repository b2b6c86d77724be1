"""layerwise.DenseTarget: KL(dense || pruned) and NLL from the last hidden states equal the plain formulas."""

from __future__ import annotations

import pytest
import torch

from helpers import make_family_model, make_tiny_model
from gqaprune.prune.layerwise import DenseTarget, Head, capture_layer_inputs, check_layers, kl, nll, run_layers

IDS = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(5))


def _truth(head, ref_h, h, ids):
    """(NLL, KL) with the logits in float64: what both fp32 paths approximate."""
    def logp(x):
        z = head.head(head.norm(x))[:, :-1].double()
        if head.softcap:
            z = torch.tanh(z / head.softcap) * head.softcap
        return torch.log_softmax(z, -1)
    a, b = logp(ref_h), logp(h)
    return nll(b, ids), float((a.exp() * (a - b)).sum())


def _close(got, want, rel=1e-3):
    # fp32 rounding of terms about log(vocab) in size, per position; a wrong formula is off by the KL itself
    return abs(got - want) <= rel * abs(want)


def _states(model, ids, scale=1.0):
    layers = check_layers(model, "test")
    (h, kw), = capture_layer_inputs(model, ids, ids.shape[0])
    with torch.no_grad():
        return run_layers(layers, h * scale, kw)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: a logit softcap, so the plain path
def test_kl_and_nll_match_the_plain_formulas(family):
    m = make_tiny_model() if family == "llama" else make_family_model(family)
    head = Head(m, "test")
    with torch.no_grad():
        ref_h, other_h = _states(m, IDS), _states(m, IDS, scale=1.5)   # a perturbed "pruned" model
        target = DenseTarget(head, ref_h)
        assert target.linear == (family == "llama")
        want_nll, want_kl = _truth(head, ref_h, other_h, IDS)
        assert want_kl > 1e-2                              # the perturbation moved the distribution
        got_nll, got_kl = target.nll_kl(other_h, IDS)
        assert _close(target.kl(other_h), want_kl) and _close(got_kl, want_kl)
        assert _close(kl(head.logprobs(ref_h), head.logprobs(other_h)), want_kl)   # the plain formula too
        assert _close(got_nll, want_nll, 1e-5)
        assert abs(target.kl(ref_h)) < 1e-3 * want_kl      # the dense model against itself


def test_kl_with_an_lm_head_bias():
    m = make_tiny_model()
    with torch.no_grad():
        lin = m.get_output_embeddings()
        new = torch.nn.Linear(lin.in_features, lin.out_features, bias=True)
        new.weight.copy_(lin.weight)
        new.bias.normal_(0, 0.5)
        m.set_output_embeddings(new)
        head = Head(m, "test")
        ref_h, other_h = _states(m, IDS), _states(m, IDS, scale=0.5)
        want_nll, want_kl = _truth(head, ref_h, other_h, IDS)
        got_nll, got_kl = DenseTarget(head, ref_h).nll_kl(other_h, IDS)
        assert want_kl > 1e-2 and _close(got_kl, want_kl) and _close(got_nll, want_nll, 1e-5)
