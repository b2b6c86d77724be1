"""gqaprune: GQA-aware structured pruning for Llama, Mistral, Qwen2/3, Gemma-2/3 and Phi-3 models.

Importing the package registers the per-layer pruned classes of every family with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a per-layer
checkpoint without ``trust_remote_code``.
"""

from gqaprune.errors import GQAPruneError
from gqaprune.models import pruned_deci as _pruned_deci  # noqa: F401  (registers Auto classes)
from gqaprune.models import pruned_gqa as _pruned_gqa  # noqa: F401

__version__ = "0.1.0"
__all__ = ["GQAPruneError", "__version__"]
