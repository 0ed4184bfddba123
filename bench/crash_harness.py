"""Crash harness: SIGKILL `srlm run` at random moments, resume each time, compare with an uninterrupted run.

    python bench/crash_harness.py --kills 20 [--seed 0] [--work /tmp/srlm-crash]

Runs the whole loop on a tiny randomly initialised model (srlm.testing) with the test fixtures, so a full run
takes seconds. Each kill is aimed at a stage, at a moment drawn within that stage's duration in the uninterrupted
run, so kills land in every stage, the second-long ones too. At the end it checks, against an uninterrupted run
of the same config and seed: the same record ids and counts in every stage file, no duplicate ids, no
`.partial`/`.work` leftovers, and loadable checkpoints M1..M3. It also reports whether the record texts are
identical. Exits non-zero on any mismatch. tests/test_loop.py runs a short version (three kills) in CI.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
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


def stages_done(out: Path) -> list[str]:
    """Stages the run directory's manifest marks complete (none before it exists; it is replaced atomically)."""
    try:
        stages = json.loads((out / "manifest.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return [name for name, s in stages.items() if s.get("status") == "complete"]


def kill_and_resume(out: Path, sets: list[str], order: list[str], seconds: dict[str, float], targets: list[str],
                    rng: random.Random, log=print) -> Counter:
    """Run `srlm run` into `out` until it completes, SIGKILLing it once inside each stage of `targets` (in run order).

    An attempt watches the run's stderr for the target stage's start line ("[srlm] <stage> ...") and kills at a
    random moment within the stage's duration in the uninterrupted run, so a kill lands in the stage's own work
    (not in the seconds of imports before it) and short stages (a second of judging) are hit as often as long
    ones. Returns the stage that was running at each kill (the first one the manifest does not mark complete)."""
    hit: Counter = Counter()
    targets = sorted(targets, key=order.index)
    while True:
        fresh = not (out / "manifest.json").exists()
        cmd = srlm("run", "--out", str(out), *sets) if fresh else srlm("run", "--resume", str(out))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started: dict[str, float] = {}
        tail: list[str] = []

        def watch(stream=proc.stderr, started=started, tail=tail):
            for line in stream:  # progress bars end their lines with \r, which text mode splits on too
                found = re.fullmatch(r"\[srlm\] (\S+) \.\.\.", line.strip())
                if found:
                    started[found.group(1)] = time.monotonic()
                tail[:] = (tail + [line])[-50:]

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        target = targets.pop(0) if targets else None
        if target is not None:
            while proc.poll() is None and target not in started and target not in stages_done(out):
                time.sleep(0.005)
            if target in started:
                # Kill at the drawn moment, or as soon as the stage is done if it runs faster than it did in the
                # reference run (one timed on a busier machine): the kill then lands just after it, never after the
                # whole run has ended.
                deadline = started[target] + rng.uniform(0.0, max(seconds.get(target, 0.0), 0.05))
                while time.monotonic() < deadline and proc.poll() is None and target not in stages_done(out):
                    time.sleep(0.005)
        if target is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done = stages_done(out)
            running = next((s for s in order if s not in done), "after the last stage")
            hit[running] += 1
            log(f"  kill: aimed at {target}, landed in {running}")
            watcher.join()
            continue
        proc.wait()
        watcher.join()
        if proc.returncode != 0:
            raise RuntimeError(f"srlm run --resume {out} exited {proc.returncode}:\n{''.join(tail)[-3000:]}")
        return hit


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
    print(f"uninterrupted run: {time.time() - start:.1f}s")
    stages = json.loads((args.work / "reference" / "manifest.json").read_text())["stages"]
    order, seconds = list(stages), {name: s["seconds"] for name, s in stages.items()}

    rng = random.Random(args.seed)
    hit, rounds, ok, identical = Counter(), 0, True, True
    # Rounds of kill-and-resume until enough kills have landed: the first aimed at every stage, then random halves.
    while sum(hit.values()) < args.kills:
        rounds += 1
        targets = order if rounds == 1 else [s for s in order if rng.random() < 0.5] or [rng.choice(order)]
        targets = targets[: args.kills - sum(hit.values())]
        print(f"round {rounds}: aiming at {', '.join(targets)}", flush=True)
        out = args.work / f"killed-{rounds}"
        try:
            hit += kill_and_resume(out, sets, order, seconds, targets, rng)
        except RuntimeError as e:
            print(f"FAIL: round {rounds}: {e}")
            return 1
        print(f"round {rounds} finished; against the uninterrupted run:")
        ok &= compare(args.work / "reference", out)
        identical &= records(args.work / "reference") == records(out)
    print(f"kills: {sum(hit.values())} in {rounds} round(s); landed in: "
          f"{', '.join(f'{s} {hit[s]}' for s in order + ['after the last stage'] if hit[s])}; "
          f"record texts identical to the reference: {identical}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
