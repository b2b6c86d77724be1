"""Evaluation: perplexity (stated protocol), zero-shot accuracy (lm-eval), side-by-side comparison."""
