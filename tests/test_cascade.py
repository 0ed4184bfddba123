"""Cascade attention (srlm/backends/cascade.py): rows that continue the same prompt read its keys and values from
one shared copy, and attend exactly as over a cache of their own."""
from __future__ import annotations

import pytest

from srlm.backends import HFGenerator, SamplingParams
from srlm.backends.cascade import MODEL_TYPES
from srlm.config import ModelConfig
from srlm.testing import tiny_of_type

torch = pytest.importorskip("torch")


def _whole_cache_attention(query, keys, values, mask):
    """The reference: sdpa over each row's whole cache, grouped-query heads repeated."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2)


@pytest.mark.parametrize("prefix", [0, 4])
@pytest.mark.parametrize("copies", [[3, 3, 3, 3], [1, 3, 2, 1], [5]])
def test_shared_rows_attend_as_each_row_over_its_whole_cache(copies, prefix):
    """Uniform groups (plain reshapes), uneven ones (as after rows finish) and one prompt for every row; with and
    without a prefix all prompts share; padded prompts; grouped-query heads (9 query heads over 3 key/value heads,
    as the embedded model)."""
    from srlm.backends.cascade import SharedRows

    gen = torch.Generator().manual_seed(0)
    prompts, kv_heads, heads, dim, width, own = len(copies), 3, 9, 16, 11, 4
    shared_k = torch.randn(prompts, kv_heads, width, dim, generator=gen)
    shared_v = torch.randn(prompts, kv_heads, width, dim, generator=gen)
    shared_k[:, :, :prefix], shared_v[:, :, :prefix] = shared_k[:1, :, :prefix], shared_v[:1, :, :prefix]
    row_of = torch.repeat_interleave(torch.arange(prompts), torch.tensor(copies))
    rows = len(row_of)
    own_k, own_v = torch.randn(rows, kv_heads, own, dim, generator=gen), torch.randn(rows, kv_heads, own, dim, generator=gen)
    query = torch.randn(rows, heads, 1, dim, generator=gen)
    prompt_mask = torch.ones(prompts, width, dtype=torch.bool)
    prompt_mask[0, prefix + 1 : prefix + 4] = False  # pads between the prefix and a prompt's rest

    ours = SharedRows([shared_k], [shared_v], prompt_mask, row_of, prefix).attend(0, query, own_k, own_v, None)
    keys = torch.cat([shared_k[row_of], own_k], dim=2)
    values = torch.cat([shared_v[row_of], own_v], dim=2)
    mask = torch.cat([prompt_mask[row_of], torch.ones(rows, own, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(ours, _whole_cache_attention(query, keys, values, mask), rtol=1e-5, atol=1e-5)


def test_shared_rows_in_bf16_are_as_exact_as_sdpa_in_bf16():
    """Against attention in fp32, the cascade in bf16 errs no more than sdpa in bf16 does: its fused kernels keep
    the scores in fp32, and the parts are merged in fp32."""
    from srlm.backends.cascade import SharedRows

    gen = torch.Generator().manual_seed(2)
    prompts, copies, kv_heads, g, dim, prefix, rest, own = 6, 3, 3, 3, 32, 40, 30, 5
    rows = prompts * copies
    keys, values = torch.randn(prompts, kv_heads, prefix + rest, dim, generator=gen) * 2, torch.randn(
        prompts, kv_heads, prefix + rest, dim, generator=gen)
    keys[:, :, :prefix], values[:, :, :prefix] = keys[:1, :, :prefix], values[:1, :, :prefix]
    prompt_mask = torch.ones(prompts, prefix + rest, dtype=torch.bool)
    prompt_mask[:, prefix : prefix + 4] = False
    row_of = torch.arange(prompts).repeat_interleave(copies)
    query = torch.randn(rows, kv_heads * g, 1, dim, generator=gen) * 2
    own_k, own_v = torch.randn(rows, kv_heads, own, dim, generator=gen) * 2, torch.randn(rows, kv_heads, own, dim,
                                                                                         generator=gen)
    mask = torch.cat([prompt_mask[row_of], torch.ones(rows, own, dtype=torch.bool)], dim=1)
    whole = lambda dtype: _whole_cache_attention(query.to(dtype), torch.cat([keys[row_of], own_k], 2).to(dtype),
                                                 torch.cat([values[row_of], own_v], 2).to(dtype), mask).float()
    exact = whole(torch.float32)
    bf16 = torch.bfloat16
    ours = SharedRows([keys.to(bf16)], [values.to(bf16)], prompt_mask, row_of, prefix).attend(
        0, query.to(bf16), own_k.to(bf16), own_v.to(bf16), None)
    assert ours.dtype == bf16
    assert (ours.float() - exact).abs().max() <= 1.25 * (whole(bf16) - exact).abs().max()


def test_shared_rows_select_keeps_rows_and_drops_prompts_no_row_continues():
    from srlm.backends.cascade import SharedRows

    gen = torch.Generator().manual_seed(1)
    shared_k, shared_v = torch.randn(3, 1, 5, 8, generator=gen), torch.randn(3, 1, 5, 8, generator=gen)
    shared_k[:, :, :2], shared_v[:, :, :2] = shared_k[:1, :, :2], shared_v[:1, :, :2]
    prompt_mask = torch.tensor([[True] * 5, [True] * 5, [True, True, False, True, True]])
    shared = SharedRows([shared_k], [shared_v], prompt_mask, torch.tensor([0, 0, 1, 1, 2, 2]), prefix=2)
    keep = torch.tensor([0, 4, 5])  # prompt 1 loses both its rows, prompt 0 one of two
    shared.select(keep)
    assert shared.keys[0].shape[0] == 2 and shared.row_of.tolist() == [0, 1, 1] and not shared.uniform
    own_k, own_v = torch.randn(3, 1, 2, 8, generator=gen), torch.randn(3, 1, 2, 8, generator=gen)
    query = torch.randn(3, 2, 1, 8, generator=gen)
    ours = shared.attend(0, query, own_k, own_v, None)
    kept = torch.tensor([0, 2, 2])
    mask = torch.cat([prompt_mask[kept], torch.ones(3, 2, dtype=torch.bool)], dim=1)  # prompt 2's pad stays out
    reference = _whole_cache_attention(query, torch.cat([shared_k[kept], own_k], 2), torch.cat([shared_v[kept], own_v], 2),
                                       mask)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hf_decoding_of_repeated_prompts_goes_through_the_cascade_and_matches_without(tiny_model, device, model_type,
                                                                                      tmp_path):
    """A batch of repeated prompts (a judge's k samples) decodes through SharedRows, rows leave the batch as they
    stop, and the sampled tokens and their log-probabilities are those of decoding without it: for each
    architecture the cascade is used with."""
    if device != "cpu":
        pytest.skip("the cascade is used on CPUs")
    from srlm.backends import cascade

    model = tiny_of_type(tiny_model, model_type, tmp_path)
    gen = HFGenerator(model, ModelConfig(name_or_path=str(model), dtype="float32"), device, batch_size=16)
    assert gen.model.config.model_type == model_type
    assert gen._cascade
    rubric = "You grade answers. Read the question and the answer below carefully, then grade them.\n"
    texts = [rubric + q for q in ("Q: 1 2 3", "Q: apple banana", "Q: judge the") for _ in range(3)] + [rubric + "Q: alone"]
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12, stop=("e",), logprobs=True, seed=3)
    calls = []
    attend = cascade.SharedRows.attend
    cascade.SharedRows.attend = lambda self, *a: calls.append((len(self.row_of), self.prefix)) or attend(self, *a)
    try:
        with_cascade = gen.generate(texts, params)
    finally:
        cascade.SharedRows.attend = attend
    assert len({rows for rows, _ in calls}) > 1  # decoded through it, and rows left the batch on the way
    assert {prefix for _, prefix in calls} != {0}  # with the rubric as the shared prefix
    gen._cascade = False
    without = gen.generate(texts, params)
    assert [c.text for c in with_cascade] == [c.text for c in without]
    for a, b in zip(with_cascade, without):
        torch.testing.assert_close(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs), rtol=1e-4, atol=1e-4)
    assert len({c.n_tokens for c in with_cascade}) > 1


def test_hf_uses_the_cascade_on_a_cpu_in_fp32_and_bf16(tiny_model, device):
    """Measured faster in both (bench/README.md); in bf16 its attention is as exact as sdpa's (the test above), so
    bf16 decoding goes through it too."""
    if device != "cpu":
        pytest.skip("the cascade is used on CPUs")
    from srlm.backends import cascade

    fp32 = HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float32"), device)
    bf16 = HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="bfloat16"), device)
    assert fp32._cascade and bf16._cascade
    fp16 = HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float16"), device)
    assert not fp16._cascade  # not measured in fp16: transformers' own attention
    calls = []
    attend = cascade.SharedRows.attend
    cascade.SharedRows.attend = lambda self, *a: calls.append(len(self.row_of)) or attend(self, *a)
    try:
        out = bf16.generate(["Q: 1 2 3", "Q: 1 2 3"], SamplingParams(temperature=0.7, max_new_tokens=4, seed=1))
    finally:
        cascade.SharedRows.attend = attend
    assert len(out) == 2 and calls
