"""What lower precision would cost and buy on this CPU (a benchmark, not a test; not a setting of srlm).

For the embedded model in fp32, bf16 and int8 dynamic quantization of some or all of its linear layers
(`torch.ao.quantization.quantize_dynamic`, PyTorch's int8 path that runs fast on a CPU without `torch.compile`), it
prints the teacher-forced loss of the shipped IFT responses (nats per response token: how much the setting changes
the model) and the speed of a decoding step's matrix products (a batch of 128 rows through every linear layer) against
fp32's. bench/README.md ("Generation") has the figures and why srlm does not quantize.

    .venv/bin/python bench/precision.py              # about four minutes on 2 cores
    .venv/bin/python bench/precision.py --examples 64
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

# Which linear layers each int8 setting quantizes, by module-name fragment.
INT8_SETTINGS = (("int8, every linear layer", ("layers.", "lm_head")),
                 ("int8, decoder layers", ("layers.",)),
                 ("int8, all but the MLP down projection", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj")),
                 ("int8, MLP down projection only", ("down_proj",)),
                 ("int8, attention projections only", ("q_proj", "k_proj", "v_proj", "o_proj")),
                 ("int8, LM head only", ("lm_head",)))


def quantized(model, fragments: tuple[str, ...]):
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    chosen = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and any(f in name for f in fragments)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization warns that it moves to torchao
        return quantize_dynamic(copy.deepcopy(model), chosen)


def response_loss(model, tokenizer, examples) -> float:
    """Mean negative log-likelihood per response token (end-of-turn included), the prompt chat-templated."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for e in examples:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            head = tokenizer(prompt, add_special_tokens=False).input_ids
            tail = tokenizer(e.response + tokenizer.eos_token, add_special_tokens=False).input_ids
            ids = torch.tensor([head + tail])
            logits = model(ids).logits[0, len(head) - 1 : -1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, len(head):], reduction="sum").item()
            count += len(tail)
    return total / count


def step_seconds(model, rows: int, repeats: int) -> float:
    """Seconds for `rows` hidden states through every linear layer once (a decoding step's matrix products)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    dtype = next(model.parameters()).dtype  # the embedding's, which quantization leaves as it is
    inputs = [torch.randn(rows, m.in_features, dtype=dtype) for m in layers]
    with torch.inference_mode():
        for _ in range(2):
            for m, x in zip(layers, inputs):
                m(x)
        start = time.perf_counter()
        for _ in range(repeats):
            for m, x in zip(layers, inputs):
                m(x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=24, help="IFT seed examples to score (default 24)")
    parser.add_argument("--rows", type=int, default=128, help="rows of the timed step (default 128, a CPU batch)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from srlm import models
    from srlm.config import ModelConfig
    from srlm.seed import load_ift

    config = ModelConfig()
    path = models.resolve(config)
    tokenizer = models.load_tokenizer(path, config)
    fp32 = models.load_model(path, config, "cpu", dtype=torch.float32).eval()
    examples = load_ift()[: args.examples]
    settings = [("fp32", fp32), ("bf16", copy.deepcopy(fp32).to(torch.bfloat16))]
    settings += [(name, quantized(fp32, fragments)) for name, fragments in INT8_SETTINGS]
    base = None
    print(f"{len(examples)} IFT responses, a step of {args.rows} rows through every linear layer:")
    for name, model in settings:
        loss = response_loss(model, tokenizer, examples)
        seconds = step_seconds(model, args.rows, args.repeats)
        base = base or seconds
        speed = f"{1000 * seconds:6.1f} ms, {base / seconds:4.2f}x fp32"
        print(f"  {name:<40} loss {loss:.3f} nats/token   matrix products {speed}", flush=True)


if __name__ == "__main__":
    main()
