#!/usr/bin/env python
"""Merge a LoRA adapter into its pruned base model and save the result like the base.

    python scripts/merge_and_save_lora.py --pruned_model PRUNED --lora_dir LORA --output_dir MERGED

A thin wrapper over ``gqaprune.recover.merge.merge_and_save_lora``; ``gqaprune merge`` takes the same options.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from gqaprune.console import run_guarded
    from gqaprune.options import add_options, options_from_args
    from gqaprune.recover.merge import MergeOptions, merge

    parser = argparse.ArgumentParser(prog="merge_and_save_lora.py", description=__doc__.split("\n\n")[0])
    add_options(parser, MergeOptions, underscore=True)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def run() -> int:
        print("\n".join(merge(options_from_args(MergeOptions, ns)).lines()))
        return 0

    return run_guarded("merge_and_save_lora.py", "merge", run)


if __name__ == "__main__":
    sys.exit(main())
