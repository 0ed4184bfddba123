"""Speed benchmark (issue 5): generation tokens/s per backend setting, judge throughput per judge mode, DPO pairs/s,
and peak memory, all in one run on the same inputs, with ratios against the naive baseline (transformers fp32,
batch 16, no prefix reuse). Not a test: it prints figures and writes them to a JSON file.

    .venv/bin/python bench/speed.py                      # embedded model, 256 prompts x 128 tokens (~30 min on 2 cores)
    .venv/bin/python bench/speed.py --prompts 64 --quick # a few minutes

Prompts are the shipped IFT seed prompts; judged candidates are the seed's own responses.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms from /proc)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 2)


def generation(model_path, requests, new_tokens: int, settings: list[tuple[str, str, int]]) -> list[dict]:
    from srlm.backends import HFGenerator, SamplingParams
    from srlm.config import ModelConfig

    rows = []
    for name, dtype, batch in settings:
        gen = HFGenerator(model_path, ModelConfig(dtype=dtype), "cpu", batch_size=batch)
        gen.generate(requests[:2], SamplingParams(max_new_tokens=4))  # warm-up: first-call allocations
        with PeakRSS() as mem:
            start = time.perf_counter()
            out = gen.generate(requests, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=new_tokens, seed=0))
            seconds = time.perf_counter() - start
        tokens = sum(c.n_tokens for c in out)
        rows.append({"setting": name, "dtype": dtype, "batch_size": batch, "tokens": tokens,
                     "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1), "peak_rss_gib": mem.gib})
        print(f"  {name:<28} {tokens / seconds:7.1f} tok/s  ({tokens} tokens, {seconds:.0f} s, {mem.gib} GiB)",
              flush=True)
        del gen
    return rows


def judging(model_path, examples, k: int, dtype: str, batch: int) -> tuple[list[dict], dict]:
    from srlm.backends import HFGenerator
    from srlm.config import ModelConfig
    from srlm.evaluation import spearman
    from srlm.judging import judge, judge_expected
    from srlm.pairs import candidate_scores
    from srlm.records import Candidate, Prompt

    prompts = [Prompt(id=e.id, text=e.prompt, iteration=0, source="user") for e in examples]
    candidates = [Candidate(id=f"{e.id}-c", prompt_id=e.id, index=0, text=e.response) for e in examples]
    gen = HFGenerator(model_path, ModelConfig(dtype=dtype), "cpu", batch_size=batch)
    modes = [
        ("sample, k=%d (paper)" % k, lambda out: judge(gen, prompts, candidates, out, k=k, batch_size=batch)),
        ("expected, no prefix reuse", lambda out: judge_expected(gen, prompts, candidates, out, batch_size=batch,
                                                                   reuse_prefix=False)),
        ("expected, prefix reuse", lambda out: judge_expected(gen, prompts, candidates, out, batch_size=batch)),
    ]
    rows, scores = [], {}
    with TemporaryDirectory() as tmp:
        for i, (name, run) in enumerate(modes):
            with PeakRSS() as mem:
                start = time.perf_counter()
                judgments = run(Path(tmp) / f"{i}.jsonl")
                seconds = time.perf_counter() - start
            scores[name] = candidate_scores(judgments)
            failed = sum(j.score is None for j in judgments)
            rows.append({"mode": name, "candidates": len(candidates), "judgments": len(judgments),
                         "parse_failures": failed, "seconds": round(seconds, 1),
                         "candidates_per_s": round(len(candidates) / seconds, 3),
                         "judgments_per_s": round(len(judgments) / seconds, 3), "peak_rss_gib": mem.gib})
            print(f"  {name:<28} {len(candidates) / seconds:6.2f} candidates/s  ({len(judgments)} judgments, "
                  f"{failed} failed, {seconds:.0f} s)", flush=True)
    sampled, expected = scores[modes[0][0]], scores[modes[2][0]]
    both = [c.id for c in candidates if c.id in sampled and c.id in expected]
    agreement = {"candidates_scored_by_both": len(both),
                 "spearman_sample_vs_expected": spearman([sampled[i] for i in both], [expected[i] for i in both])
                 if len(both) > 2 else None}
    return rows, agreement


def dpo(model_path, examples, n_pairs: int) -> dict:
    from srlm.config import load_config
    from srlm.dpo import train_dpo
    from srlm.records import Pair

    # Chosen: the seed's answer; rejected: its first sentence. Real text, a clear preference, short sequences.
    pairs = [Pair(id=e.id, prompt_id=e.id, prompt=e.prompt, chosen_id="c", rejected_id="r", chosen=e.response,
                  rejected=e.response.split(". ")[0], chosen_score=4, rejected_score=1) for e in examples[:n_pairs]]
    config = load_config(overrides=["device=cpu", "dpo.batch_size=4", "dpo.micro_batch_size=2", "dpo.max_length=384",
                                    "dpo.save_steps=1000"])
    with TemporaryDirectory() as tmp, PeakRSS() as mem:
        start = time.perf_counter()
        train_dpo(model_path, pairs, Path(tmp) / "M2", config)
        seconds = time.perf_counter() - start
    print(f"  DPO: {len(pairs) / seconds:.2f} pairs/s ({len(pairs)} pairs, {seconds:.0f} s, {mem.gib} GiB)", flush=True)
    return {"pairs": len(pairs), "seconds": round(seconds, 1), "pairs_per_s": round(len(pairs) / seconds, 3),
            "peak_rss_gib": mem.gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--judge-candidates", type=int, default=48)
    parser.add_argument("--dpo-pairs", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="fewer generation settings")
    parser.add_argument("--skip", nargs="*", default=[], choices=["generation", "judging", "dpo"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    args = parser.parse_args()

    from srlm import models
    from srlm.config import ModelConfig
    from srlm.seed import load_ift

    model_path = models.resolve(ModelConfig(name_or_path=args.model))
    examples = load_ift()
    requests = [[{"role": "user", "content": e.prompt}] for e in (examples * 2)[: args.prompts]]
    settings = [("naive: fp32, batch 16", "float32", 16), ("fp32, batch 64", "float32", 64),
                ("bf16, batch 16", "bfloat16", 16), ("bf16, batch 64", "bfloat16", 64)]
    if args.quick:
        settings = [settings[0], settings[-1]]
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}, "model": args.model,
              "prompts": len(requests), "new_tokens": args.new_tokens}
    if "generation" not in args.skip:
        print(f"generation: {len(requests)} prompts x {args.new_tokens} new tokens", flush=True)
        rows = generation(model_path, requests, args.new_tokens, settings)
        for row in rows:
            row["ratio_vs_naive"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
        result["generation"] = rows
    if "judging" not in args.skip:
        print(f"judging: {args.judge_candidates} candidates", flush=True)
        rows, agreement = judging(model_path, examples[: args.judge_candidates], 3, "float32", 16)
        for row in rows:
            row["ratio_vs_sample"] = round(row["candidates_per_s"] / rows[0]["candidates_per_s"], 1)
        result["judging"], result["judge_mode_agreement"] = rows, agreement
        print(f"  Spearman(sample k=3, expected) over the same candidates: {agreement['spearman_sample_vs_expected']}")
    if "dpo" not in args.skip:
        print("dpo:", flush=True)
        result["dpo"] = dpo(model_path, examples, args.dpo_pairs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
