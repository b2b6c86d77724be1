"""Inference speed and memory of models side by side (``gqaprune bench``)."""
