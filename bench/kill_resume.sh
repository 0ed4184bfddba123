#!/usr/bin/env bash
# Kill `srlm run` with SIGKILL in the middle of stages, resume it, and compare the artifact counts with
# an uninterrupted run of the same config (issue: "nothing lost").
#   bench/kill_resume.sh RUN_DIR REFERENCE_RUN_DIR [srlm run options...]
# Kill points: once a training checkpoint exists inside SFT, and once judgments are half written in iter 1.
# The options default to --set generation.batch_size=16, so that iteration 1's 72 judgments are written in
# several batches (with the default, auto, they are one); make the reference run with the same options.
set -uo pipefail
out=$1; ref=$2; shift 2
[ $# -gt 0 ] || set -- --set generation.batch_size=16
srlm=${SRLM:-srlm}
rm -rf "$out"

wait_for() {  # wait until the test in $1 holds, or the run exits
  while ! eval "$1"; do
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 1
  done
}

"$srlm" run --out "$out" "$@" >"$out.log" 2>&1 & pid=$!
wait_for "ls -d $out/models/M1.work/checkpoint-* >/dev/null 2>&1" && kill -9 $pid && echo "killed during sft (after a checkpoint)"
wait $pid 2>/dev/null
"$srlm" run --resume "$out" >>"$out.log" 2>&1 & pid=$!
wait_for "[ -f $out/iter_1/judgments.jsonl.partial ] && [ \$(wc -l < $out/iter_1/judgments.jsonl.partial) -ge 32 ]" \
  && kill -9 $pid && echo "killed during iter_1.judgments ($(wc -l < $out/iter_1/judgments.jsonl.partial) judgments written)"
wait $pid 2>/dev/null
"$srlm" run --resume "$out" >>"$out.log" 2>&1 || { echo "resume failed; see $out.log"; exit 1; }

status=0
for f in "$ref"/iter_*/*.jsonl; do
  rel=${f#"$ref"/}
  a=$(wc -l < "$f"); b=$(wc -l < "$out/$rel" 2>/dev/null || echo missing)
  same=$([ "$(cut -c1-60 "$f" | sort)" = "$(cut -c1-60 "$out/$rel" | sort)" ] && echo "same ids" || echo "ids differ")
  echo "$rel: reference $a, resumed $b ($same)"
  [ "$a" = "$b" ] || status=1
done
for t in 1 2 3; do [ -f "$out/models/M$t/model.safetensors" ] && echo "models/M$t: ok" || { echo "models/M$t missing"; status=1; }; done
exit $status
