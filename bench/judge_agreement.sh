#!/usr/bin/env bash
# Judge agreement with human rankings (PAPER.md §5) of the embedded model before and after SFT on the seed
# EFT, on the held-out split of ../shared/data/oasst2-srlm.
#   bench/judge_agreement.sh RUN_DIR [MAX_PROMPTS] [K] [MODE] [MODELS]
# RUN_DIR: a finished `srlm run` (its models/M1 is "after"); M0 is the converted embedded model.
# MODE: judge.mode, sample (the paper's: K sampled judgments averaged; the default) or expected (one forward pass).
# MODELS: which of "M0 M1" to measure (default both).
set -euo pipefail
run=$1; max=${2:-30}; k=${3:-1}; mode=${4:-sample}; which=${5:-M0 M1}
data=${SRLM_DATA:-../shared/data/oasst2-srlm/oasst2_evaluation_fine_tuning.jsonl}
srlm=${SRLM:-srlm}
for name in $which; do
  model=$([ "$name" = M0 ] && echo embedded:smollm2-135m-instruct || echo "$run/models/$name")
  echo "== $name ($model), judge.mode=$mode"
  "$srlm" eval judge --model "$model" --data "$data" --split eval --max-prompts "$max" --out "$run/eval/$name-$mode" \
    --set judge.k="$k" --set judge.mode="$mode" 2> >(grep -E "^srlm: error|left out" >&2)
done
