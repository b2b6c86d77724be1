"""Block-wise reconstruction: trained layers move towards the dense layers; a layer that gets worse on held-out
samples keeps its weights; recorded in the plan."""

from __future__ import annotations

import copy
import json

import torch

from gqaprune.cli import main
from gqaprune.prune.options import PruneOptions
from gqaprune.prune.reconstruct import reconstruct
from gqaprune.prune.steps import prune_model
from helpers import make_tiny_model, prune_args

IDS = torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(0))


def _kl(dense, pruned, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(pruned(input_ids=ids).logits.float(), -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def _pruned():
    dense = make_tiny_model()
    pruned, _ = prune_model(copy.deepcopy(dense), PruneOptions(recipe="fast", pruning_ratio=0.4, calib_batch_size=4),
                            IDS, progress=False)
    return dense, pruned


def test_reconstruction_lowers_the_error_against_the_dense_model():
    dense, pruned = _pruned()
    fresh = torch.randint(3, 300, (8, 24), generator=torch.Generator().manual_seed(1))   # never trained on
    kl0 = _kl(dense, pruned, fresh)
    rep = reconstruct(pruned, dense, IDS, epochs=8, lr=1e-3, batch_size=4, progress=False)
    kept = [x for x in rep["layers"] if x["kept"]]
    assert kept and all(x["heldout_after"] < x["heldout_before"] for x in kept)
    assert all(x["err_after"] < x["err_before"] for x in kept)
    assert _kl(dense, pruned, fresh) < kl0
    assert rep["samples_heldout"] == 2 and rep["summary"]["kept"] == len(kept)


def test_a_layer_that_gets_worse_keeps_its_weights():
    dense, pruned = _pruned()
    before = copy.deepcopy(pruned.state_dict())
    rep = reconstruct(pruned, dense, IDS, epochs=2, lr=10.0, batch_size=4, progress=False)   # diverges
    rejected = [x["layer"] for x in rep["layers"] if not x["kept"]]
    assert rejected
    after = pruned.state_dict()
    for i in rejected:
        for k, v in before.items():
            if k.startswith(f"model.layers.{i}."):
                assert torch.equal(after[k], v), k


def test_prune_cli_records_the_reconstruction(tiny_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "o"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.3", "--reconstruct-epochs", "2",
                           "--reconstruct-lr", "1e-3")) == 0
    rec = json.loads((out / "prune_plan.json").read_text())["provenance"]["reconstruction"]
    assert rec["epochs"] == 2 and len(rec["layers"]) == 2
    assert "block-wise reconstruction" in capsys.readouterr().out.replace("\n", " ")
