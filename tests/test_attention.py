"""srlm_sdpa, the attention used while training with dropout on a CPU: sdpa's arithmetic with a faster dropout mask."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from srlm import attention
from srlm.config import ModelConfig
from srlm.models import load_model


def test_drop_mask_keeps_each_entry_with_probability_one_minus_p_under_the_torch_seed():
    torch.manual_seed(0)
    mask = ~attention.drop_mask((4, 9, 200, 300), 0.1)
    assert mask.dtype == torch.bool and mask.shape == (4, 9, 200, 300)
    assert mask.float().mean().item() == pytest.approx(0.9, abs=0.002)  # 2.16M draws: 5 standard deviations
    assert attention.drop_mask((1000, 1000), 0.5).float().mean().item() == pytest.approx(0.5, abs=0.003)
    # The run's seed decides the masks: the same seed, the same mask; the next draw, another.
    torch.manual_seed(0)
    again = ~attention.drop_mask((4, 9, 200, 300), 0.1)
    assert torch.equal(mask, again)
    assert not torch.equal(again, ~attention.drop_mask((4, 9, 200, 300), 0.1))
    # Neighbouring entries are independent: P(both kept) = 0.81.
    pair = mask.flatten()[:-1] & mask.flatten()[1:]
    assert pair.float().mean().item() == pytest.approx(0.81, abs=0.003)


def module(groups: int, training: bool = True):
    return SimpleNamespace(training=training, num_key_value_groups=groups, is_causal=True)


def reference(q, k, v, keep, p, scaling, mask):
    """Attention with dropout by definition, in float64: softmax(q k^T * scaling, masked) * keep / (1 - p) @ v."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ k.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1) * keep / (1 - p)
    return (weights @ v).transpose(1, 2)


@pytest.mark.parametrize("padded", [False, True])
def test_training_attention_is_dropout_attention_by_definition(monkeypatch, padded):
    """Outputs and gradients against the definition, with the mask the function drew; GQA (9 query heads on 3
    key/value heads), and either no mask (sdpa's mask function omits a purely causal one) or a padding mask."""
    torch.manual_seed(1)
    batch, length, p = 2, 12, 0.25
    q = torch.randn(batch, 9, length, 16, requires_grad=True)
    k = torch.randn(batch, 3, length, 16, requires_grad=True)
    v = torch.randn(batch, 3, length, 16, requires_grad=True)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal.expand(batch, 1, length, length).clone()
    if padded:
        mask[0, :, :, :3] = False  # row 0 is left-padded by 3
        mask[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # pads see themselves, as sdpa_mask leaves no row empty
    drawn = []
    original = attention.drop_mask
    monkeypatch.setattr(attention, "drop_mask", lambda shape, p: drawn.append(original(shape, p)) or drawn[-1])
    out, _ = attention.attention(module(3), q, k, v, mask if padded else None, dropout=p, scaling=0.25)
    keep = ~drawn[0]
    expected = reference(q, k, v, keep, p, 0.25, mask)
    assert out.shape == (batch, length, 9, 16)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5)
    assert 0.6 < keep.float().mean() < 0.9  # a real draw: about 3 in 4 kept


def test_bf16_inputs_keep_fp32_scores():
    """With bf16 queries and keys (autocast's output), scores and softmax stay fp32: the error is that of rounding
    the probabilities and the values to bf16 once, not of bf16 scores."""
    torch.manual_seed(2)
    q, k = (torch.randn(1, 4, 64, 32) * 3).bfloat16(), (torch.randn(1, 4, 64, 32) * 3).bfloat16()
    v = torch.randn(1, 4, 64, 32).bfloat16()
    for t in (q, k, v):
        t.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        out, _ = attention.attention(module(1), q, k, v, None, dropout=0.1, scaling=32**-0.5)
    torch.manual_seed(3)
    keep = ~attention.drop_mask((1, 4, 64, 64), 0.1)
    expected = reference(q, k, v, keep, 0.1, 32**-0.5, torch.ones(64, 64, dtype=torch.bool).tril())
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() < 0.03
    # The backward pass through the bf16 path (which masks its probabilities in place) matches too.
    weights = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        assert (got.double() - want.double()).abs().max() < 0.05 * want.double().abs().max()


def test_without_dropout_it_is_sdpa():
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 9, 10, 16), torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    want, _ = sdpa_attention_forward(module(3, training=False), q, k, v, None, dropout=0.0, scaling=0.25)
    for m in (module(3, training=False), module(3)):  # transformers passes dropout 0 outside training
        got, _ = attention.attention(m, q, k, v, None, dropout=0.0, scaling=0.25)
        assert torch.equal(got, want)


def test_training_on_a_cpu_with_dropout_uses_it_and_checkpoints_do_not_name_it(tiny_model, tmp_path):
    config = ModelConfig(name_or_path=str(tiny_model))
    model = load_model(tiny_model, config, "cpu", dropout=0.1)
    assert model.config._attn_implementation == attention.NAME
    assert load_model(tiny_model, config, "cpu", dropout=0.0).config._attn_implementation == "sdpa"
    assert load_model(tiny_model, config, "cpu").config._attn_implementation == "sdpa"
    chosen = ModelConfig(name_or_path=str(tiny_model), attention="sdpa")
    assert load_model(tiny_model, chosen, "cpu", dropout=0.1).config._attn_implementation == "sdpa"
    # Training mode: the same seed gives the same loss, and dropout is really applied (not eval's loss).
    ids = torch.tensor([[5, 9, 14, 20, 7, 3, 11, 4]])
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    model.eval()
    assert losses[0] == losses[1] != model(input_ids=ids, labels=ids).loss.item()
    # A checkpoint is a plain transformers model: another process loads it without srlm.
    model.save_pretrained(tmp_path / "M")
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "M" / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "M").config._attn_implementation == "sdpa"
