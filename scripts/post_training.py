#!/usr/bin/env python
"""LoRA recovery fine-tuning of a pruned model, with the seed guide's flags.

    python scripts/post_training.py --prune_model PRUNED_DIR --data_path yahma/alpaca-cleaned \\
        --output_dir ./finetuned --num_epochs 2 --learning_rate 5e-5 --batch_size 128 --micro_batch_size 4 \\
        --lora_r 8 --lora_alpha 16 --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj \\
        --extra_val_dataset wikitext2 --cache_dataset
    torchrun --nproc_per_node=4 scripts/post_training.py ...     # data-parallel

A thin wrapper over ``gqaprune.recover.finetune.finetune``; ``gqaprune finetune`` takes the same options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from gqaprune.console import run_guarded
    from gqaprune.options import add_options, options_from_args
    from gqaprune.recover.options import FinetuneOptions
    from gqaprune.recover.finetune import finetune

    parser = argparse.ArgumentParser(prog="post_training.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, FinetuneOptions, underscore=True)
    ns = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def run() -> int:
        result = finetune(options_from_args(FinetuneOptions, ns))
        if rank == 0:
            print("\n".join(result.lines()))
        return 0

    return run_guarded("post_training.py", "finetune", run)


if __name__ == "__main__":
    sys.exit(main())
