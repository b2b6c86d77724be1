#!/usr/bin/env python
"""The seed guide's evaluate_lora_model.py: a thin wrapper over gqaprune.evaluate.suite.

    python scripts/evaluate_lora_model.py --pruned_model PRUNED --lora_dir LORA --device cuda:0 \\
        [--base_model ORIGINAL] [--tasks boolq,piqa,...] [--limit N] [--output_dir OUT]

Same options as `gqaprune eval`, in the seed scripts' underscore style.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from gqaprune.console import run_guarded
    from gqaprune.evaluate.suite import EvalOptions, evaluate_model
    from gqaprune.options import add_options, options_from_args

    p = argparse.ArgumentParser(prog="evaluate_lora_model.py", description=__doc__.split("\n\n")[0])
    add_options(p, EvalOptions, underscore=True)
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def run() -> int:
        opts = options_from_args(EvalOptions, ns)
        opts.output = opts.output or "eval_results"
        suite = evaluate_model(opts)
        print(suite.markdown())
        print(f"saved {opts.output}/eval.json and eval.md")
        return 0

    return run_guarded("evaluate_lora_model.py", "eval", run)


if __name__ == "__main__":
    sys.exit(main())
