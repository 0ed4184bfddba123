"""Decoding rows that continue the same prompt, with that prompt's keys and values held once.

A judge samples k=3 justifications of each candidate, and a candidate stage N responses to each prompt, so a
batch's rows come in groups that share everything but the tokens they have decoded, and every judge prompt starts
with the same rubric. A decoding step's attention reads every row's keys and values, and on a CPU that read is bound
by memory bandwidth: for the embedded model in fp32 at batch 128, a step took 181 ms with an empty cache and 431 ms
with 600 tokens per row, about what a judge prompt holds. With the whole cache per row, sdpa was 300 ms of a 470 ms
step over 126 rows of 522-token judge prompts.

`SharedRows` holds the batch's shared prefix once, each distinct prompt's rest once, and which prompt each row
continues; the batch's cache (`GrowingLayer` with `offset`) holds only what rows decode. For the judge's k=3 that
reads about a quarter as much: the step above takes about 300 ms. The attention function registered here (`NAME`)
takes the shared rows as the keyword `cascade`, attends to each part with PyTorch's fused CPU kernel and merges the
parts by their log-sum-exp: the same attention as over the row's whole cache, not an approximation (vLLM and
FlashInfer call this cascade attention). Without that keyword (prefill, scoring) it is transformers' sdpa, unchanged.
"""
from __future__ import annotations

NAME = "srlm_cascade"
# Architectures whose attention is what `SharedRows.attend` computes (grouped-query softmax attention, no soft-capping,
# sinks or position biases), each checked against sdpa in tests/test_cascade.py.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class SharedRows:
    """What a decoding batch's rows share, held once per layer: the text every prompt starts with (`prefix` tokens:
    the judge rubric, a chat template's system prompt) and each distinct prompt's rest, with `row_of`, the prompt
    each batch row continues (sorted: a prompt's rows are next to each other).

    `keys`, `values`: per layer, [prompts, kv heads, length, dim], every row starting with the same `prefix`
    positions (as `HFGenerator._side_by_side` lays them out); `mask`: [prompts, length], True where a row attends
    (False on the pads between the prefix and a prompt's rest). Nothing is copied: the prefix is read from the
    first prompt's row."""

    def __init__(self, keys: list, values: list, mask, row_of, prefix: int = 0):
        self.prefix = prefix
        self.prefix_keys = [k[0, :, :prefix] for k in keys]  # [kv heads, prefix, dim]
        self.prefix_values = [v[0, :, :prefix] for v in values]
        self.keys, self.values = [k[:, :, prefix:] for k in keys], [v[:, :, prefix:] for v in values]
        self._index(mask[:, prefix:], row_of)

    def _index(self, mask, row_of) -> None:
        import torch

        self.mask, self.row_of = mask, row_of
        # Added to each prompt's scores: a pad's probability is exactly zero.
        self.bias = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=self.keys[0].dtype, device=mask.device)
        self.bias.masked_fill_(~mask[:, None, None, :], torch.finfo(self.bias.dtype).min)
        counts = torch.bincount(row_of, minlength=mask.shape[0])
        self.copies = int(counts.max())
        # Every prompt with the same number of rows (the usual case until rows finish): plain reshapes, no scatter.
        self.uniform = bool((counts == self.copies).all())
        starts = torch.cumsum(counts, 0) - counts
        self.slot = torch.arange(len(row_of), device=row_of.device) - starts[row_of]  # a row's place in its group

    def select(self, keep) -> None:
        """Keep batch rows `keep` (ascending), and only the prompts some row still continues."""
        import torch

        row_of, mask = self.row_of[keep], self.mask
        live = torch.unique(row_of)
        if len(live) < len(mask):
            self.keys = [k.index_select(0, live) for k in self.keys]
            self.values = [v.index_select(0, live) for v in self.values]
            if self.prefix_keys[0]._base is not None:  # a view still: its own copy, so the first storage can go
                self.prefix_keys = [k.clone() for k in self.prefix_keys]
                self.prefix_values = [v.clone() for v in self.prefix_values]
            mask, row_of = mask[live], torch.searchsorted(live, row_of)
        self._index(mask, row_of)

    def _to_groups(self, x):
        """[rows, kv heads, g, m] -> [prompts, kv heads, copies * g, m]: each prompt's rows as one matrix of queries
        (zeros where a prompt has fewer rows than the most)."""
        rows, heads, g, m = x.shape
        prompts = self.keys[0].shape[0]
        if not self.uniform:
            padded = x.new_zeros(prompts, self.copies, heads, g, m)
            padded[self.row_of, self.slot] = x
            x = padded
        return x.view(prompts, self.copies, heads, g, m).transpose(1, 2).reshape(prompts, heads, self.copies * g, m)

    def _from_groups(self, y, g: int):
        """The inverse of `_to_groups`, for [prompts, kv heads, copies * g, m]."""
        prompts, heads, _, m = y.shape
        y = y.view(prompts, heads, self.copies, g, m).transpose(1, 2)
        if self.uniform:
            return y.reshape(prompts * self.copies, heads, g, m)
        return y[self.row_of, self.slot]

    def attend(self, layer: int, query, key, value, scaling: float | None):
        """Attention of one new token per row ([rows, heads, 1, dim]) over the shared prefix, the row's prompt (less
        its pads) and every token the row has decoded (`key`, `value`: [rows, kv heads, n, dim]). Returns [rows, 1,
        heads, dim], as transformers' attention functions do.

        Each part is one call of PyTorch's fused CPU attention kernel, which also gives each query's log-sum-exp of
        scores; the parts' outputs are merged by those, which is the softmax over all of them (flash attention's
        merge). The kernel keeps scores in fp32 in any dtype. Three fused calls took 2.0 ms a layer against 3.2 ms for
        the scores, one softmax and the products written out (126 rows of 3 copies, 522-token prompts, fp32)."""
        import torch

        rows, heads, length, dim = query.shape
        if length != 1:
            raise ValueError(f"cascade attention decodes one token per row, got {length}")
        prompts, kv_heads = self.keys[layer].shape[:2]
        g = heads // kv_heads  # query heads per key/value head (grouped-query attention)
        scale = dim**-0.5 if scaling is None else scaling
        by_row = query.view(rows, kv_heads, g, dim)
        q = self._to_groups(by_row)  # [prompts, kv heads, copies * g, dim]
        parts = [_attention(q, self.keys[layer], self.values[layer], self.bias, scale)]
        own, own_lse = _attention(by_row, key, value, None, scale)
        parts.append((self._to_groups(own), self._to_groups(own_lse[..., None])[..., 0]))
        if self.prefix:
            # Every row's queries against the one prefix: [1, kv heads, prompts * copies * g, dim].
            on_prefix, lse = _attention(q.transpose(0, 1).reshape(1, kv_heads, -1, dim),
                                        self.prefix_keys[layer][None], self.prefix_values[layer][None], None, scale)
            parts.append((on_prefix.view(kv_heads, prompts, -1, dim).transpose(0, 1),
                          lse.view(kv_heads, prompts, -1).transpose(0, 1)))
        total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
        out = sum(part * (lse - total).exp()[..., None] for part, lse in parts)
        return self._from_groups(out.to(value.dtype), g).reshape(rows, 1, heads, dim)


def _attention(query, key, value, bias, scale: float):
    """PyTorch's fused CPU attention (what sdpa runs on a CPU): (output, log-sum-exp of each query's scores, fp32)."""
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=bias, scale=scale)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, cascade: SharedRows | None = None, **kwargs):
    """transformers' attention-function signature: (output [batch, length, heads, dim], None). With `cascade` (a
    decoding step over `SharedRows`), `key` and `value` are the rows' own tokens, and the pads to leave out are
    `cascade.mask`'s (`attention_mask` covers the same positions; the decoded tokens are all attended); without it,
    sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cascade is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return cascade.attend(module.layer_idx, query, key, value, scaling), None


def register() -> str:
    """Make the attention function known to transformers (with sdpa's mask format); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
