"""Terminal output for the CLI: one console, and the one-line renderings every summary shares."""

from __future__ import annotations

import functools


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
