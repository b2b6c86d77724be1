"""Models: load and save references (io.py), their shape (layout.py), the per-layer class
(pruned_gqa.py) and LoRA adapters (adapters.py)."""
