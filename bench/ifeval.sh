#!/usr/bin/env bash
# IFEval (Zhou et al., 2023) of one model on ../shared/data/ifeval, greedy, scored offline.
#   bench/ifeval.sh MODEL [LIMIT] [MAX_NEW_TOKENS] [OUT]
# MODEL: a model directory (e.g. runs/<ts>/models/M1) or embedded:smollm2-135m-instruct.
# LIMIT: the first N of the 541 prompts (default 20; measured on a 2-core CPU, a `make run`'s M1 took about
# 4 min for 50 prompts at 512 tokens, batched in bf16; half of its responses run to the cap).
# Rerunning with the same arguments resumes; with a larger LIMIT it answers only the new prompts.
set -euo pipefail
model=$1; limit=${2:-20}; max=${3:-512}
data=${SRLM_DATA:-../shared/data/ifeval/input_data.jsonl}
srlm=${SRLM:-srlm}
name=$([ "$model" = "${model#embedded}" ] && basename "$model" || echo M0)
out=${4:-runs/ifeval/$name-$max}
"$srlm" eval ifeval --model "$model" --data "$data" --limit "$limit" --max-new-tokens "$max" --out "$out"
