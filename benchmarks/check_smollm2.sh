#!/usr/bin/env bash
# `gqaprune check` on real SmolLM2 prunes: a reasonable one (recipe balanced, 20%) must pass, a broken copy of
# it (the final norm's gain x 40: same shapes, confidently wrong logits) must fail on the PPL row only.
#   bash benchmarks/check_smollm2.sh CHECKPOINT [OUT_MD]
# CHECKPOINT: e.g. prune_log/recipes_bench/balanced_20_s0 (written by benchmarks/recipes_smollm2.py).
# The limit is scaled by --base-model's PPL on the same first 16,384 WikiText-2 test tokens.
set -uo pipefail
cd "$(dirname "$0")/.."
CK="$1"; OUT="${2:-benchmarks/results/check_smollm2.md}"
export GQAPRUNE_DATA_DIR="${GQAPRUNE_DATA_DIR:-../shared/data}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TMP=$(mktemp -d); BROKEN="$TMP/broken"; cp -r "$CK" "$BROKEN"
python - "$BROKEN" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
f = Path(sys.argv[1]) / "model.safetensors"
sd = load_file(f); sd["model.norm.weight"] = sd["model.norm.weight"] * 40; save_file(sd, f, metadata={"format": "pt"})
PY
ARGS=(--base-model smollm2-135m --ppl-max-tokens 16384 --device cpu --dtype fp32)
{
  echo "# \`gqaprune check\` on SmolLM2-135M prunes"
  echo
  echo "- date: $(date -u +%FT%TZ); machine: $(nproc --all) cores; git $(git rev-parse --short HEAD); load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- command: \`bash benchmarks/check_smollm2.sh $*\`; each run: \`gqaprune check DIR ${ARGS[*]}\`"
  echo "- *broken*: a copy of the checkpoint with the final norm's gain multiplied by 40 (shapes intact)"
  for name in reasonable broken; do
    dir=$([ $name = reasonable ] && echo "$CK" || echo "$BROKEN")
    COLUMNS=200 gqaprune check "$dir" "${ARGS[@]}" > "$TMP/$name.txt" 2>"$TMP/$name.err"; rc=$?
    echo; echo "## $name ($dir): exit $rc"; echo; echo '```'
    grep -E "PPL|all checks|some checks|parameter count|Q:KV ratio|model loads" "$TMP/$name.txt"
    echo '```'
  done
} > "$OUT"
cat "$OUT"
