"""Structured pruning: structure (units) -> calibrate -> importance -> plan -> surgery."""
