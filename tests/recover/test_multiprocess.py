"""Data-parallel fine-tuning: 2 CPU processes (gloo) under torchrun (and, with --runslow, accelerate launch)
run scripts/post_training.py.

Checks that the Trainer really shards the data (each rank trains on different records), that
the gradient accumulation accounts for the world size, that evaluation with an extra PPL corpus
(computed on rank 0 only) does not deadlock, and that exactly one adapter is written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import save_per_layer, write_records, write_text

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str) -> list[str]:
    port = f"--master_port={_free_port()}" if kind == "torchrun" else f"--main_process_port={_free_port()}"
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", port]
    # accelerate's --multi_gpu launcher is torchrun underneath; with no GPU the Trainer uses gloo on CPU.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", port]


@pytest.mark.parametrize("kind", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_processes_shard_data_and_save_one_adapter(tmp_path, kind):
    base = save_per_layer(tmp_path / "base")
    data = write_records(tmp_path / "data.jsonl")
    val = write_text(tmp_path / "val.txt", n_words=600)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "WANDB_MODE"):
        env.pop(k, None)
    for attempt in range(3):   # the free port can be taken between picking it and the launcher binding it: retry
        out = tmp_path / f"out{attempt}"
        args = [str(REPO / "scripts" / "post_training.py"),
                "--prune_model", str(base), "--data_path", str(data), "--output_dir", str(out),
                "--batch_size", "4", "--micro_batch_size", "1", "--max_steps", "3", "--save_steps", "2",
                "--eval_steps", "2", "--val_set_size", "8", "--cutoff_len", "192", "--logging_steps", "1",
                "--extra_val_dataset", str(val), "--extra_val_max_tokens", "256",
                "--cache_dataset", "--cache_dir", str(tmp_path / "cache"), "--log_sample_ids"]
        proc = subprocess.run(_launcher(kind) + args, env=env, capture_output=True, text=True, timeout=480,
                              cwd=tmp_path)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "gradient accumulation 2 x 2 process(es)" in proc.stderr

    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["grad_accum"] == 2 and summary["global_step"] == 3
    assert summary["ppl_after"]["val"]["n_tokens"] > 0

    # each rank logged the record indices of its training batches; they must differ
    r0 = [int(x) for ln in (out / "samples_rank0.txt").read_text().split() for x in ln.split(",")]
    r1 = [int(x) for ln in (out / "samples_rank1.txt").read_text().split() for x in ln.split(",")]
    assert len(r0) >= 6 and len(r1) >= 6           # 3 steps x 2 micro-batches of 1 each (+ prefetch)
    assert not set(r0[:6]) & set(r1[:6]), (r0, r1)  # disjoint shards
    # exactly one adapter at the top (plus one per checkpoint), written once by rank 0
    adapters = sorted(p.relative_to(out).as_posix() for p in out.rglob("adapter_model.safetensors"))
    assert adapters == ["adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors",
                        "checkpoint-3/adapter_model.safetensors"]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in ln]
    assert steps == [1, 2, 3]                        # metrics written once (rank 0), not per rank
    from gqaprune.outputs import foreign_entries

    assert foreign_entries(out) == []                # rank 0's manifest claims what every rank wrote
