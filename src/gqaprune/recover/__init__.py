"""Recovery after pruning: LoRA fine-tuning (optionally distilled from the dense model) and merging."""
