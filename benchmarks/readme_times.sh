#!/usr/bin/env bash
# Times the README's first-screen commands on this machine (run it with nothing else running):
#   bash benchmarks/readme_times.sh [OUT_DIR]        (RUNS="prune" bash ... for a subset)
# the prune command on the whole WikiText-2 test, then the quick variant (--ppl-max-tokens 32768), then
# the prune alone (no perplexity passes: the recipe's own cost, which the 3x prune-time rule is about),
# and `fast` alone (that rule's yardstick: the default until 2026-12-01);
# each line of benchmarks/results/readme_times.md comes from /usr/bin/time's wall seconds here.
# (Install and test times come from `.ci/run`, whose pytest line prints its own duration.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d)}"
export GQAPRUNE_DATA_DIR="${GQAPRUNE_DATA_DIR:-../shared/data}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() {  # name, then the gqaprune arguments
  local name=$1; shift
  /usr/bin/time -f "%e" -o "$OUT/$name.time" gqaprune prune "$@" > "$OUT/$name.log" 2>&1
  echo "| $name | \`gqaprune prune $*\` | $(cat "$OUT/$name.time") |"
}
{
  echo "# README first-screen times"
  echo
  echo "- date: $(date -u +%FT%TZ); machine: $(nproc --all) cores, $(uname -m); git $(git rev-parse --short HEAD); load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "| run | command | wall s |"
  echo "|---|---|---:|"
  for r in ${RUNS:-full quick prune fast}; do
    case $r in
      full) run full --model smollm2-135m --pruning-ratio 0.2 --output "$OUT/full" --eval-ppl wikitext2 ;;
      quick) run quick --model smollm2-135m --pruning-ratio 0.2 --output "$OUT/quick" --eval-ppl wikitext2 --ppl-max-tokens 32768 ;;
      prune) run prune --model smollm2-135m --pruning-ratio 0.2 --output "$OUT/prune" ;;
      fast) run fast --model smollm2-135m --pruning-ratio 0.2 --recipe fast --output "$OUT/fast" ;;
      *) echo "RUNS: unknown run $r (full, quick, prune, fast)" >&2; exit 2 ;;
    esac
  done
}
