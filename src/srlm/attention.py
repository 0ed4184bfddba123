"""Attention while training on a CPU with dropout: what sdpa computes there, faster.

PAPER.md §4 trains with dropout 0.1, which for a Llama-family model is dropout on the attention probabilities. On a
CPU neither of PyTorch's fused attention kernels takes dropout, so `scaled_dot_product_attention` falls back to its
reference path, which is slow twice over: it upcasts bf16 queries, keys and values to fp32 for both products, and it
draws the dropout mask with PyTorch's Mersenne Twister one entry at a time (18% of an SFT step of the embedded model
in the torch profiler, more than all the linear layers' forward products).

`srlm_sdpa` keeps the scores and the softmax in fp32, as there, but casts the probabilities to bf16 for their product
with the values, as flash attention does, so that product runs on the CPU's bf16 units; and it draws the mask as
random bytes (numpy's PCG64, seeded from PyTorch's generator so that `seed` still decides every mask; 16 random bits
per entry against the keep probability). One SFT step of 640 tokens on the embedded model, LM head included: sdpa
2.9-3.4 s; fp32 products and the fast mask 2.85 s; bf16 product and PyTorch's mask 2.4-2.7 s; both, as here, 2.2 s
(bf16 scores too would give 2.0 s, at the price of rounding them). Outside training, or without dropout, it is
transformers' sdpa, fused kernels and all. It is used only on a CPU: CUDA's fused kernels take dropout.
"""
from __future__ import annotations

NAME = "srlm_sdpa"


def drop_mask(shape, p: float):
    """A boolean tensor of `shape`, each entry True (dropped) with probability p (to within 2^-16), independently.

    The randomness is numpy's PCG64 under a seed drawn from PyTorch's default generator, so that a run's seed
    decides the masks as it decides everything else."""
    import math

    import numpy as np
    import torch

    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    draws = np.frombuffer(np.random.default_rng(seed).bytes(2 * n), dtype=np.uint16)
    return torch.from_numpy(draws >= round((1 - p) * 65536)).view(shape)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (output [batch, length, heads, dim], None).

    Training with dropout: scores and softmax in fp32 (as sdpa's reference path computes them), the probabilities
    cast to the values' dtype for the product with them (as flash attention does) and dropped out. Otherwise:
    transformers' sdpa."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not dropout:  # transformers passes 0 outside training
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_length, kv_length = query.shape[2], key.shape[2]
    if attention_mask is None:
        # sdpa's mask function leaves out a mask that is only causal; the queries are the last q_length positions.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_length > 1:
            attention_mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(
                kv_length - q_length)
    # Autocast would round the scores to bf16: the dtypes here are chosen, not cast.
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.float() * scaling, key.float().transpose(2, 3))
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask.float()
        weights = torch.softmax(scores, dim=-1).to(value.dtype)
        dropped = drop_mask(weights.shape, dropout).to(weights.device)
        # Inverted dropout, its 1 / (1 - p) applied to the product (dim columns) rather than the probabilities (length
        # columns). In place only on a cast copy: softmax keeps its own output for the backward pass.
        cast = value.dtype != torch.float32
        weights = weights.masked_fill_(dropped, 0) if cast else weights.masked_fill(dropped, 0)
        output = torch.matmul(weights, value) * (1.0 / (1.0 - dropout))
    return output.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `srlm_sdpa` known to transformers (attention function and mask format, sdpa's); returns its name.
    Registering again replaces the entries with the same ones."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
