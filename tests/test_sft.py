"""SFT (srlm.sft): what train_sft hands TRL, checked on the tiny model."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import tiny_config
from srlm.records import IFTExample
from srlm.sft import train_sft

ONE_EXAMPLE = [IFTExample(id="a", prompt="Name a colour.", response="Blue.")]


def _config(tiny_model, *extra: str):
    return tiny_config(tiny_model, "sft.epochs=1", "sft.save_steps=100", *extra)


def _spy_on_trainer(monkeypatch, look) -> dict:
    """What `look(kwargs)` returns for the keyword arguments train_sft builds SFTTrainer with."""
    from trl import SFTTrainer

    seen: dict = {}
    original = SFTTrainer.__init__

    def spy(self, *args, **kwargs):
        seen.update(look(kwargs))
        original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "__init__", spy)
    return seen


def _train_once(tiny_model, tmp_path, padding_free: bool) -> None:
    """One optimizer step on two examples of different lengths, in one micro-batch, without dropout."""
    ift = ONE_EXAMPLE + [IFTExample(id="b", prompt="Say something longer about the sea, please.",
                                     response="The sea is wide and deep, and it covers most of the planet we live on.")]
    config = _config(tiny_model, "sft.batch_size=2", "sft.micro_batch_size=2", "sft.dropout=0", "sft.bf16=false",
                     f"sft.padding_free={str(padding_free).lower()}")
    out = tmp_path / ("M1-packed" if padding_free else "M1-padded")
    train_sft(tiny_model, ift, [], out, config)
    assert (out / "model.safetensors").exists()


def test_padding_free_sft_trains_on_the_same_loss_as_padded(tiny_model, tmp_path, monkeypatch):
    # With sdpa, padding-free batches rely on transformers finding the sequence boundaries in position_ids and
    # masking across them; were it to miss them, the short example would attend to the long one and the loss differ.
    losses = {}
    from trl import SFTTrainer

    original = SFTTrainer.compute_loss

    def record(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        value = loss[0] if isinstance(loss, tuple) else loss
        losses.setdefault(self.args.padding_free, []).append(float(value.detach()))
        assert ("attention_mask" in inputs) != self.args.padding_free  # padded batches carry a mask, packed ones not
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", record)
    _train_once(tiny_model, tmp_path, padding_free=False)
    _train_once(tiny_model, tmp_path, padding_free=True)
    assert len(losses[False]) == len(losses[True]) == 1
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4)


def test_padding_free_is_off_with_sdpa_by_default(tiny_model, tmp_path, monkeypatch):
    seen = _spy_on_trainer(monkeypatch, lambda kw: {"padding_free": kw["args"].padding_free,
                                                    "max_length": kw["args"].max_length})
    config = _config(tiny_model)
    train_sft(tiny_model, ONE_EXAMPLE, [], tmp_path / "M1", config)
    assert seen == {"padding_free": False, "max_length": config.sft.max_length}


def test_model_attention_is_what_training_loads(tiny_model, tmp_path, monkeypatch):
    seen = _spy_on_trainer(monkeypatch, lambda kw: {"attention": kw["model"].config._attn_implementation})
    train_sft(tiny_model, ONE_EXAMPLE, [], tmp_path / "M1", _config(tiny_model, "model.attention=eager"))
    assert seen == {"attention": "eager"}


def test_an_attention_this_machine_lacks_is_a_model_error(tiny_model, tmp_path, capsys):
    from srlm.cli import main

    # flash-attn is a CUDA package; on a machine without it transformers refuses flash_attention_2 when loading.
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    code = main(["sft", "--model", str(tiny_model), "--out", str(tmp_path / "M1"),
                 "--set", "model.attention=flash_attention_2", "--set", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 6, err
    assert "model.attention='flash_attention_2' cannot be used here" in err and "Traceback" not in err
    assert not (tmp_path / "M1").exists()
