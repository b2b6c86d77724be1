#!/usr/bin/env bash
# The seed guide's one-click script: prune (if the pruned folder is missing), LoRA fine-tune,
# merge, evaluate and report, with the guide's v3 hyperparameters. A thin wrapper over `gqaprune run`.
#
#   ./scripts/finetune_gqa_aware_pruned_v3.sh                 # full run
#   PROFILE=quick ./scripts/finetune_gqa_aware_pruned_v3.sh   # minutes on a CPU with smollm2-135m
#
# Environment overrides: MODEL (or GQAPRUNE_MODEL), DATA_PATH (GQAPRUNE_DATA_PATH),
# OUTPUT_ROOT (GQAPRUNE_OUTPUT_ROOT), PROFILE (full|quick), PRUNING_RATIO, LAYOUT, WANDB_PROJECT.
# Extra arguments are passed to `gqaprune run`. The guide's v3 hyperparameters (2 epochs, lr 5e-5,
# batch 128, micro batch 4, cutoff 256, LoRA r 8 / alpha 16) are the full profile's defaults; they are
# not passed here, so PROFILE=quick keeps its small ones (explicit flags win over a profile).
set -euo pipefail
export GQAPRUNE_MODEL="${MODEL:-${GQAPRUNE_MODEL:-smollm2-135m}}"
export GQAPRUNE_DATA_PATH="${DATA_PATH:-${GQAPRUNE_DATA_PATH:-yahma/alpaca-cleaned}}"
export GQAPRUNE_OUTPUT_ROOT="${OUTPUT_ROOT:-${GQAPRUNE_OUTPUT_ROOT:-./runs/gqa_aware_pruned_v3}}"
exec gqaprune run \
    --model "$GQAPRUNE_MODEL" --data-path "$GQAPRUNE_DATA_PATH" --output-root "$GQAPRUNE_OUTPUT_ROOT" \
    --profile "${PROFILE:-full}" --pruning-ratio "${PRUNING_RATIO:-0.2}" --layout "${LAYOUT:-uniform}" \
    --wandb-project "${WANDB_PROJECT:-}" "$@"
