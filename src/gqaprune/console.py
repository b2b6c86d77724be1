"""Terminal output for the CLI and the seed-guide scripts: one console, the one-line renderings every
summary shares, and the one guard that turns errors and Ctrl-C into a message and an exit code."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable

from gqaprune.errors import GQAPruneError, Interrupted

# what is left after Ctrl-C, per command (outputs are written atomically at the end unless said here)
ON_INTERRUPT = {
    "finetune": "checkpoints saved so far are kept in --output_dir; continue with --resume_from_checkpoint last",
    "run": "finished steps and LoRA checkpoints are kept; run the same command again to continue",
    "prune": "nothing was written to the output folder",
    "merge": "nothing was written to the output folder",
    "eval": "no result was written",
    "export": "no .gguf was written (only complete files are renamed into place)",
}


def run_guarded(prog: str, command: str, fn: Callable[[], int]) -> int:
    """Run ``fn`` (parsing options included) and return its exit code; bad input -> a message and 2,
    Ctrl-C -> one line saying what was kept and 130. Anything else is a bug and keeps its traceback.

    After an interrupt, further Ctrl-C are ignored while the process shuts down, so a second one
    cannot turn a clean stop into "Exception ignored in threading" noise.
    """
    try:
        return fn()
    except GQAPruneError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (Interrupted, KeyboardInterrupt) as e:   # Interrupted: stopped cleanly, says where it saved
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        said = f": {e}" if isinstance(e, Interrupted) else ""
        print(f"{prog}: interrupted{said}; {ON_INTERRUPT.get(command, 'no result was written')}", file=sys.stderr)
        return Interrupted.exit_code


@functools.lru_cache(maxsize=1)
def console():
    """The rich console the CLI prints its summaries to (stdout)."""
    from rich.console import Console

    return Console()


def ppl_line(p: dict) -> str:
    """A perplexity with its protocol: dataset, split, window, stride and token count."""
    cut = f", first {p['max_tokens']:,} tokens only" if p.get("max_tokens") else ""
    return (f"{p['dataset']} {p['split']}: PPL {p['ppl']:.2f} (window {p['seq_len']}, stride {p['stride']}, "
            f"{p['n_tokens']:,} tokens scored{cut})")
