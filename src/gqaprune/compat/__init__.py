"""Patches to and version shims for other libraries: one module per library, each naming the version it
targets and what breaks without it, each with a test in tests/compat/.

transformers.py      checkpointing/sampler/cache names across 5.x; Trainer private hooks (eval sampler,
                     checkpoint timing)
huggingface_hub.py   offline mode for modules that read HF_HUB_OFFLINE once at import
datasets.py          the same for ``datasets.config``
lm_eval.py           lm-eval's git-hash lookup and expected warnings, silenced for a block
peft.py              PEFT's read of a deprecated transformers attribute, silenced
liger.py             Liger fused kernels: applied per kernel, failures reported
"""
