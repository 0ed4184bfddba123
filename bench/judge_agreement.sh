#!/usr/bin/env bash
# Judge agreement with human rankings (PAPER.md §5) of the embedded model before and after SFT on the seed
# EFT, on the held-out split of ../shared/data/oasst2-srlm.
#   bench/judge_agreement.sh RUN_DIR [MAX_PROMPTS] [K]
# RUN_DIR: a finished `srlm run` (its models/M1 is "after"); M0 is the converted embedded model.
set -euo pipefail
run=$1; max=${2:-30}; k=${3:-1}
data=${SRLM_DATA:-../shared/data/oasst2-srlm/oasst2_evaluation_fine_tuning.jsonl}
srlm=${SRLM:-srlm}
out=$run/eval
for model in embedded:smollm2-135m-instruct "$run/models/M1"; do
  name=$([ "$model" = "${model#embedded}" ] && basename "$model" || echo M0)
  echo "== $name ($model)"
  "$srlm" eval judge --model "$model" --data "$data" --split eval --max-prompts "$max" --out "$out/$name" \
    --set judge.k="$k" 2> >(grep -E "^srlm: error|left out" >&2)
done
