#!/usr/bin/env bash
# The seed guide's command lines, run as written with only paths changed (plus a small step
# budget), on a per-layer 50% SmolLM2-135M checkpoint with offline data. Log: $ROOT/guide_commands.log
#
#   GQAPRUNE_DATA_DIR=../shared/data bash benchmarks/guide_commands_smollm2.sh [ROOT]
set -euo pipefail
ROOT="${1:-/tmp/gqaprune_guide}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
: "${GQAPRUNE_DATA_DIR:?set GQAPRUNE_DATA_DIR to the shared data folder}"
mkdir -p "$ROOT"
exec > >(tee "$ROOT/guide_commands.log") 2>&1
set -x
date -u
[ -d "$ROOT/prune_log/llama3_gqa_aware_pruned_v3" ] || \
  gqaprune prune --recipe fast --model smollm2-135m --pruning-ratio 0.5 --layout per-layer --num-samples 16 \
    --output "$ROOT/prune_log/llama3_gqa_aware_pruned_v3"
gqaprune check "$ROOT/prune_log/llama3_gqa_aware_pruned_v3" --max-ppl 1e9 --ppl-max-tokens 4096 || true

CUDA_VISIBLE_DEVICES=0 python scripts/post_training.py \
    --prune_model "$ROOT/prune_log/llama3_gqa_aware_pruned_v3" \
    --data_path yahma/alpaca-cleaned \
    --output_dir "$ROOT/finetuned_llama3_gqa_aware_v3" \
    --wandb_project llama3-gqa-aware-finetune-v3 \
    --num_epochs 2 --learning_rate 5e-5 --batch_size 128 --micro_batch_size 4 \
    --lora_r 8 --lora_alpha 16 \
    --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj \
    --extra_val_dataset wikitext2 --cache_dataset \
    --max_steps 2 --val_set_size 40 --max_train_samples 600 --extra_val_max_tokens 2048 --overwrite

# the guide's other named settings (val_set_size 2000, cutoff_len 128, warmup 100, micro batch 2, batch 64,
# lr 3e-5, lora_alpha 8), one optimizer step
python scripts/post_training.py \
    --prune_model "$ROOT/prune_log/llama3_gqa_aware_pruned_v3" --data_path yahma/alpaca-cleaned \
    --output_dir "$ROOT/finetuned_guide_flags" --num_epochs 2 --learning_rate 3e-5 --batch_size 64 \
    --micro_batch_size 2 --cutoff_len 128 --val_set_size 2000 --warmup_steps 100 --lora_r 8 --lora_alpha 8 \
    --extra_val_dataset wikitext2 --extra_val_max_tokens 2048 --max_steps 1 --max_train_samples 2200 --overwrite

torchrun --nproc_per_node=2 scripts/post_training.py \
    --prune_model "$ROOT/prune_log/llama3_gqa_aware_pruned_v3" --data_path yahma/alpaca-cleaned \
    --output_dir "$ROOT/finetuned_ddp" --batch_size 16 --micro_batch_size 4 --max_steps 2 \
    --val_set_size 20 --max_train_samples 200 --extra_val_dataset wikitext2 --extra_val_max_tokens 1024 \
    --cache_dataset --overwrite

python scripts/merge_and_save_lora.py --pruned_model "$ROOT/prune_log/llama3_gqa_aware_pruned_v3" \
    --lora_dir "$ROOT/finetuned_llama3_gqa_aware_v3" --output_dir "$ROOT/merged_v3" --overwrite

python scripts/evaluate_lora_model.py --pruned_model "$ROOT/prune_log/llama3_gqa_aware_pruned_v3" \
    --lora_dir "$ROOT/finetuned_llama3_gqa_aware_v3" --device cpu --max_tokens 4096 \
    --tasks piqa --limit 20 --output_dir "$ROOT/eval_v3"
ls "$ROOT"/finetuned_llama3_gqa_aware_v3 "$ROOT"/merged_v3 "$ROOT"/eval_v3
ls "$ROOT"/finetuned_llama3_gqa_aware_v3/wandb 2>/dev/null | head
date -u
