"""Where a decoding step of srlm's hf backend spends its time, per dtype and batch size. Not a test.

On a lent H200 (2026-12-04, random weights of the embedded model's shape) a step took about 29 ms in fp32 at batch
16 (transformers' own `generate`: 26 ms) and about 83 ms in bf16 at batch 64, where the GPU's own work should be
about a millisecond (an estimate): the time goes somewhere on the host. This script times steps with and without sampling (greedy vs
temperature and top-p) for each setting, then prints torch.profiler's busiest operators for one setting, so that the
next lease can say which.

    .venv/bin/python bench/profile_decode.py --model .device/model --random-weights --device cuda
    .venv/bin/python bench/profile_decode.py --settings float32:4 bfloat16:4 --steps 8      # a try on a CPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import SAMPLING, random_weights, requests_for  # noqa: E402


def step_ms(generator, requests, steps: int, temperature: float, sync) -> float:
    """Milliseconds per decoding step: the time of `steps` new tokens less that of one (the prefill)."""
    from srlm.backends import SamplingParams

    def run(n: int) -> float:
        sync()
        start = time.perf_counter()
        generator.generate(requests, SamplingParams(max_new_tokens=n, seed=0, temperature=temperature,
                                                     top_p=SAMPLING["top_p"]))
        sync()
        return time.perf_counter() - start

    run(2)  # warm-up: first-call allocations and kernel choices
    return (run(steps + 1) - run(1)) / steps * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--random-weights", action="store_true", help="the model's shapes with random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", nargs="+", default=["float32:16", "bfloat16:16", "float32:64", "bfloat16:64"],
                        help="dtype:batch pairs to time")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps timed per setting")
    parser.add_argument("--profile", default="bfloat16:64", help="the dtype:batch setting to profile")
    args = parser.parse_args()

    import torch

    from srlm import models
    from srlm.backends import SamplingParams
    from srlm.backends.hf import HFGenerator
    from srlm.config import ModelConfig

    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else lambda: None
    with TemporaryDirectory() as tmp:
        path = args.model if args.random_weights else models.resolve(ModelConfig(name_or_path=args.model))
        if args.random_weights:
            path = random_weights(path, Path(tmp) / "random")
        for setting in dict.fromkeys(args.settings + [args.profile]):
            dtype, batch = setting.split(":")
            generator = HFGenerator(path, ModelConfig(name_or_path=str(path)), args.device, int(batch), dtype)
            requests = requests_for(int(batch))
            greedy = step_ms(generator, requests, args.steps, 0.0, sync)
            sampled = step_ms(generator, requests, args.steps, SAMPLING["temperature"], sync)
            print(f"{dtype:>9} batch {batch:>4}: {greedy:6.1f} ms/step greedy, {sampled:6.1f} ms/step sampled "
                  f"(T={SAMPLING['temperature']}, top-p {SAMPLING['top_p']})", flush=True)
            if setting == args.profile:
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
                with torch.profiler.profile(activities=activities) as prof:
                    generator.generate(requests, SamplingParams(max_new_tokens=args.steps, seed=0, **SAMPLING))
                    sync()
                for key in ["self_cpu_time_total"] + (["self_device_time_total"] if len(activities) > 1 else []):
                    print(f"-- {setting}, {args.steps} sampled steps, by {key}")
                    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50))
            del generator
    return 0


if __name__ == "__main__":
    sys.exit(main())
