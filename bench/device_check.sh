#!/usr/bin/env bash
# The GPU checks of issue 5, as one call of a lent GPU machine (which has PyTorch, transformers and accelerate, but
# no network and none of srlm's other dependencies). Prepare here, where pip works:
#
#     make device-files          # .device/: the wheels that machine lacks, the embedded model's config and tokenizer
#
# then run there, from the repository root, with .device carried:
#
#     bash bench/device_check.sh        # figures and logs go to $OUT (default: /tmp/srlm-device)
#
# DEVICE (default cuda) and BENCH_ARGS (extra bench/speed.py arguments) change what runs, PARTS which parts run
# (some of: machine tests loop profile bench), BENCH_TIMEOUT (seconds) stops the bench in time for the logs to come
# back within a lease, and PYTHON says which interpreter:
# `DEVICE=cpu PYTHON=.venv/bin/python BENCH_ARGS="--prompts 8 --new-tokens 8 ..." bash bench/device_check.sh` tries
# the script here.
#
# It runs the backend contract tests and the loop's tests on the GPU (SRLM_TEST_DEVICE=cuda), then
# bench/profile_decode.py's breakdown of a decoding step and bench/speed.py, both on a model with the embedded model's
# shapes and random weights. Its weights do not fit in what travels, and speed depends mostly on the shapes and the
# token counts; but random weights never stop early (every sequence runs to its token limit), and a random model's
# top-p nucleus never fits the sampler's shortlist (every sampled step sorts the whole vocabulary, which a trained
# model's rarely does). Each part runs even if one before it failed; the exit status says whether all passed.
#
# On an H200 (bench/README.md, run G1) the whole of it takes longer than one call may (10 minutes): the backend tests
# about 1 minute, the bench's generation and judging about 4.5, each of its training rows about 40 s (most of it
# starting a process; on a GPU it runs two per stage, fp32 and the default). A 15-minute lease (the machine's start included) fits most of it in two calls, for instance
#     PARTS="machine tests loop profile bench" BENCH_ARGS="--judge-candidates 96 --skip sft dpo" BENCH_TIMEOUT=360
#     PARTS="bench" BENCH_ARGS="--skip generation judging --sft-examples 32 --dpo-pairs 32" BENCH_TIMEOUT=<what is left>
# the second run at once, while the machine is still warm (it goes back after 30 s idle).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/srlm-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}

# The wheels go in only where srlm's dependencies are missing (there, not in a venv made by `make setup`).
if ! "$PY" -c "import trl, pydantic, datasets" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/srlm-site \
        .device/whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/srlm-site"
fi
ALL_PARTS="machine tests loop profile bench"
for name in ${PARTS:-}; do
    if [[ " $ALL_PARTS " != *" $name "* ]]; then
        echo "PARTS: no part named '$name'; the parts are: $ALL_PARTS" >&2
        exit 2
    fi
done
failed=() ran=()
part() {  # part NAME COMMAND...: run one check (if PARTS names it, or PARTS is unset), log it to $OUT/NAME.log
    local name=$1; shift
    if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
        return
    fi
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    ran+=("$name")
    if [ "$rc" -eq 124 ] && [ "$name" = bench ]; then
        failed+=("bench (stopped at BENCH_TIMEOUT=${BENCH_TIMEOUT:-}; the sections it finished are in $OUT)")
    elif [ "$rc" -ne 0 ]; then
        failed+=("$name (exit $rc)")
    fi
}

part machine sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; \
    $PY -c 'import torch, transformers, trl; print(torch.__version__, torch.version.cuda, transformers.__version__, trl.__version__)'; \
    $PY -m pip list 2>/dev/null | grep -i -E '^(accelerate|huggingface.hub|tokenizers|safetensors|pyarrow|numpy|triton) '"
part tests env SRLM_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider tests/test_backends.py
# The loop end to end, SFT and DPO on the tiny model (about a minute on a CPU).
part loop env SRLM_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider tests/test_loop.py \
    tests/test_training.py tests/test_sft.py -k "not vllm"
part profile "$PY" bench/profile_decode.py --device "$DEVICE" --model .device/model --random-weights \
    --steps "${PROFILE_STEPS:-16}"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
part bench ${BENCH_TIMEOUT:+timeout "$BENCH_TIMEOUT"} "$PY" bench/speed.py --device "$DEVICE" --model .device/model --random-weights --no-naive-judge \
    --out "$OUT/speed-$DEVICE.json" ${BENCH_ARGS:-}

if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "passed: ${ran[*]}"
if [[ " ${ran[*]} " == *" bench "* ]]; then
    echo "figures in $OUT/speed-$DEVICE.json"
fi
