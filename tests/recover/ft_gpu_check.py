"""GPU check of finetune + merge (run by hand on a CUDA machine; not collected by pytest).

    PYTHONPATH=src:tests python tests/recover/ft_gpu_check.py OUT_DIR

Builds a per-layer model the width of SmolLM2-135M (hidden 576, 9 query / 3 KV heads,
head_dim 64; 6 layers with KV groups 1..3 and MLP 512..1536), fine-tunes it with the
defaults a GPU gets (bf16 where supported, gradient checkpointing on), then merges on the
GPU. Writes OUT_DIR/gpu_check.json and prints it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from helpers import make_tokenizer, tiny_config
from helpers import write_records, write_text


def main(out: Path) -> dict:
    from gqaprune.recover.finetune import FinetuneOptions, finetune
    from gqaprune.recover.merge import merge_and_save_lora
    from gqaprune.models.io import save_checkpoint
    from gqaprune.models.pruned_gqa import GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM

    import peft
    import transformers

    report = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "cuda": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = GQAPrunedLlamaConfig(**tiny_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                             head_dim=64, intermediate_size=1536, num_hidden_layers=6).to_dict())
    cfg.kv_heads_per_layer = [1, 2, 3, 1, 2, 3]
    cfg.intermediate_size_per_layer = [512, 768, 1536, 1024, 640, 1536]
    torch.manual_seed(0)
    base = save_checkpoint(GQAPrunedLlamaForCausalLM(cfg), make_tokenizer(), work / "base")
    data = write_records(work / "data.jsonl", n=400)
    val = write_text(work / "val.txt", n_words=6000)

    steps = 12 if torch.cuda.is_available() else 2   # a CPU run only checks the script
    t0 = time.time()
    res = finetune(FinetuneOptions(prune_model=str(base), data_path=str(data), output_dir=str(work / "lora"),
                                   batch_size=16, micro_batch_size=4, max_steps=steps, eval_steps=steps // 2, save_steps=steps // 2,
                                   logging_steps=1, val_set_size=32, cutoff_len=256, learning_rate=2e-3,
                                   warmup_steps=2, extra_val_dataset=[str(val)], extra_val_max_tokens=8192,
                                   cache_dir=str(work / "cache"), cache_dataset=True))
    report["finetune_wall_s"] = round(time.time() - t0, 1)
    report["finetune"] = res.to_dict()
    report["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() \
        else None
    losses = [json.loads(ln) for ln in (work / "lora" / "metrics.jsonl").read_text().splitlines()]
    report["train_losses"] = [round(r["train/loss"], 4) for r in losses if "train/loss" in r]
    t0 = time.time()
    m = merge_and_save_lora(str(base), res.adapter_dir, str(work / "merged"))
    report["merge_wall_s"] = round(time.time() - t0, 1)
    report["merge"] = m.to_dict()
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
    rep = main(out)
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=2, default=str))
    print(json.dumps({k: v for k, v in rep.items() if k not in ("finetune", "merge")}, indent=2))
    print("\n".join(__import__("gqaprune.recover.finetune", fromlist=["FinetuneResult"]).FinetuneResult(
        **rep["finetune"]).lines()))
    print("\n".join(__import__("gqaprune.recover.merge", fromlist=["MergeResult"]).MergeResult(**rep["merge"]).lines()))
