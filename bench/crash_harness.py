"""Crash harness: SIGKILL `srlm run` at random moments, resume each time, compare with an uninterrupted run.

    python bench/crash_harness.py --kills 20 [--seed 0] [--work /tmp/srlm-crash]

Runs the whole loop on a tiny randomly initialised model (srlm.testing) with the test fixtures, so a
full run takes seconds and kills land in every stage. At the end it checks, against an uninterrupted run
of the same config and seed: the same record ids and counts in every stage file, no duplicate ids, no
`.partial`/`.work` leftovers, and loadable checkpoints M1..M3. It also reports whether the record texts
are identical. Exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FILES = ["prompts.jsonl", "prompts_attempts.jsonl", "candidates.jsonl", "judgments.jsonl", "pairs.jsonl"]


def srlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "srlm.cli", *args]


def records(root: Path) -> dict[str, list[dict]]:
    out = {}
    for t in (1, 2):
        for name in FILES:
            path = root / f"iter_{t}" / name
            out[f"iter_{t}/{name}"] = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return out


def compare(reference: Path, out: Path) -> bool:
    """Same ids and counts as the reference in every stage file, no duplicates, no leftovers, loadable models."""
    from transformers import AutoModelForCausalLM

    ok = True
    ref, got = records(reference), records(out)
    for name in ref:
        ids_ref, ids_got = [r["id"] for r in ref[name]], [r["id"] for r in got[name]]
        dup = len(ids_got) - len(set(ids_got))
        same = sorted(ids_ref) == sorted(ids_got)
        print(f"  {name:32s} reference {len(ids_ref):3d}  resumed {len(ids_got):3d}  duplicates {dup}  "
              f"{'same ids' if same else 'IDS DIFFER'}")
        ok &= same and dup == 0
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".partial", ".work", ".saving", ".tmp"))]
    if leftovers:
        print("  leftovers:", leftovers)
        ok = False
    for t in (1, 2, 3):
        AutoModelForCausalLM.from_pretrained(out / "models" / f"M{t}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/srlm-crash"))
    args = parser.parse_args()

    from srlm.testing import build_tiny_model, tiny_overrides

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    corpus = [(FIXTURES / "short_judge_template.txt").read_text()]
    for name in ("ift.jsonl", "eft.jsonl"):
        corpus += [str(v) for line in (FIXTURES / name).read_text().splitlines() for v in json.loads(line).values()]
    model = build_tiny_model(args.work / "model", corpus)
    sets = [a for o in tiny_overrides(model, FIXTURES / "ift.jsonl", FIXTURES / "eft.jsonl",
                                      FIXTURES / "short_judge_template.txt") for a in ("--set", o)]

    start = time.time()
    subprocess.run(srlm("run", "--out", str(args.work / "reference"), *sets), check=True, capture_output=True)
    full = time.time() - start
    print(f"uninterrupted run: {full:.1f}s")

    rng = random.Random(args.seed)
    kills, stages_hit, rounds, ok, identical = 0, Counter(), 0, True, True
    # Rounds of kill-and-resume until the run completes; more rounds until enough kills have landed.
    while kills < args.kills:
        rounds += 1
        out = args.work / f"killed-{rounds}"
        while True:
            fresh = not (out / "manifest.json").exists()
            cmd = srlm("run", "--out", str(out), *sets) if fresh else srlm("run", "--resume", str(out))
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            # Past the ~4 s of imports, so that every attempt makes some progress before it is killed.
            delay = rng.uniform(4.0, 4.0 + full / 3)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                path = out / "manifest.json"
                done = len(json.loads(path.read_text())["stages"]) if path.exists() else 0
                stages_hit[done] += 1
                print(f"round {rounds} kill {kills:2d} after {delay:4.1f}s ({done} stages complete)", flush=True)
                continue
            if proc.returncode != 0:
                print(proc.stderr.read()[-3000:])
                print(f"FAIL: round {rounds}: exited {proc.returncode}")
                return 1
            break
        print(f"round {rounds} finished; against the uninterrupted run:")
        ok &= compare(args.work / "reference", out)
        identical &= records(args.work / "reference") == records(out)
    print(f"kills: {kills} in {rounds} round(s); stages complete at each kill: {dict(sorted(stages_hit.items()))}; "
          f"record texts identical to the reference: {identical}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
