"""What SFT and DPO share (srlm.training): the LM head scores only labelled positions, with the same result."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from srlm.dpo import train_dpo
from srlm.records import IFTExample, Pair
from srlm.sft import train_sft
from srlm.training import scored_positions_only


class LMHeadCalls:
    """Each forward through TRL's fused LM head: the rows it projected and the positions that have a label."""

    def __init__(self):
        self.rows: list[int] = []
        self.labelled: list[int] = []

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.rows, self.labelled))


@pytest.fixture
def lm_head(monkeypatch) -> LMHeadCalls:
    from trl.trainer import utils

    calls = LMHeadCalls()
    chunked, output = utils._ChunkedLogProbFunction, utils.FusedCausalLMOutput

    class Counting:
        @staticmethod
        def apply(hidden, *rest):
            calls.rows.append(hidden.shape[0])
            return chunked.apply(hidden, *rest)

    def counted_output(**fields):
        calls.labelled.append(int(fields["label_mask"].sum()))
        return output(**fields)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Counting)
    monkeypatch.setattr(utils, "FusedCausalLMOutput", counted_output)
    return calls


def _fused_model(tiny_model):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model


def test_labelled_positions_only_give_the_same_loss_and_gradients(tiny_model, lm_head):
    model = _fused_model(tiny_model)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    labels = ids.clone()
    labels[0, :30] = -100  # a long prompt and a short response, as in an EFT example
    labels[1, :12] = -100

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), out.log_probs.detach(), [p.grad.clone() for p in model.parameters()]

    every_loss, every_logps, every_grads = loss_and_grads()
    with scored_positions_only():
        scored_loss, scored_logps, scored_grads = loss_and_grads()
    labelled = int((labels[:, 1:] != -100).sum())
    assert lm_head.pairs == [(2 * 39, labelled), (labelled, labelled)]  # TRL's default on a CPU, then ours
    assert scored_loss == pytest.approx(float(every_loss), rel=1e-6)
    torch.testing.assert_close(scored_logps, every_logps)
    for a, b in zip(scored_grads, every_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_switch_is_put_back_afterwards_even_on_an_error():
    from trl.trainer import utils

    decide = utils._use_triton
    with pytest.raises(RuntimeError), scored_positions_only():
        assert utils._use_triton(torch.device("cpu")) is True
        raise RuntimeError("a crash in training")
    assert utils._use_triton is decide
    assert utils._use_triton(torch.device("cpu")) is False


def test_sft_and_dpo_project_only_labelled_positions(tiny_model, tmp_path, lm_head):
    ift = [IFTExample(id="a", prompt="Tell me, in a few words, what colour the sky is on a clear day.",
                      response="Blue.")]
    train_sft(tiny_model, ift, [], tmp_path / "M1", tiny_config(tiny_model, "sft.epochs=1", "sft.save_steps=100", "dpo.save_steps=100"))
    assert lm_head.pairs and all(rows == labelled for rows, labelled in lm_head.pairs)
    sft_calls = len(lm_head.pairs)
    pairs = [Pair(id="p", prompt_id="q", prompt=ift[0].prompt, chosen_id="c", rejected_id="r", chosen="Blue.",
                  rejected="It is a colour, and colours are many.", chosen_score=4, rejected_score=1)]
    train_dpo(tiny_model, pairs, tmp_path / "M2", tiny_config(tiny_model, "sft.epochs=1", "sft.save_steps=100", "dpo.save_steps=100"))
    # The reference log-probabilities, computed when the trainer is built, and the training steps.
    dpo_calls = lm_head.pairs[sft_calls:]
    assert len(dpo_calls) >= 2 and all(rows == labelled for rows, labelled in dpo_calls)


@pytest.mark.parametrize("on", [False, True])
def test_the_checkpointing_switch_reaches_trl_without_a_deprecation_warning(tmp_path, on):
    import warnings

    from trl import DPOConfig, SFTConfig

    from srlm.config import RunConfig
    from srlm.training import training_arguments

    config = RunConfig()
    for section, trl_config in ((config.sft, SFTConfig), (config.dpo, DPOConfig)):
        section.gradient_checkpointing = on
        kwargs = training_arguments(section, work_dir=tmp_path, device="cpu", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = trl_config(**kwargs)
        # TRL's own default is on; what the section says must win, under the old name and the new one alike.
        assert args.gradient_checkpointing is on
        assert getattr(args, "activation_checkpointing", on) is on


@pytest.mark.parametrize("processes,micro,expected", [(1, 1, (1, 16)), (1, 4, (4, 4)), (4, 1, (1, 4)), (4, 4, (4, 1)),
                                                       (8, 4, (2, 1)), (1, 3, (2, 8)),  # 3 does not divide 16: 2 does
                                                       (3, 4, (3, 2)), (6, 4, (1, 3)),  # no even split: the nearest,
                                                       # 18 (not 24), and said so
                                                       (32, 1, (1, 1))])  # 32 processes: one example each, the least
def test_a_step_is_the_configured_batch_whatever_the_number_of_processes(tmp_path, monkeypatch, capsys, processes,
                                                                         micro, expected):
    from srlm.config import RunConfig
    from srlm.training import training_arguments

    monkeypatch.setenv("WORLD_SIZE", str(processes))  # what `accelerate launch` sets in each process
    section = RunConfig().dpo
    section.batch_size, section.micro_batch_size = 16, micro
    kwargs = training_arguments(section, work_dir=tmp_path, device="cpu", seed=0)
    assert (kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]) == expected
    step = processes * expected[0] * expected[1]
    said = f"a step is {step} examples ({processes} processes x {expected[0]} x {expected[1]} accumulated), not batch_size=16"
    assert (said in capsys.readouterr().err) == (step != 16)


def test_resume_skips_checkpoints_a_kill_left_incomplete(tmp_path):
    """A kill while the Trainer saves leaves no trainer state, or a torn one; a kill while a finished stage removes
    its work directory can leave the state without the weights. None of these is resumed from; the newest whole
    one is."""
    from srlm.training import last_checkpoint

    def checkpoint(step, state='{"global_step": 1}', weights=True):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        if weights:
            (folder / "model.safetensors").write_bytes(b"x")
        return folder

    whole = checkpoint(2)
    checkpoint(4, state=None)
    checkpoint(6, state='{"global_')
    checkpoint(8, weights=False)
    assert last_checkpoint(tmp_path) == str(whole)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]  # the broken ones are removed


def test_finishing_publishes_the_model_and_leaves_no_work_directory(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srlm.training import finish

    class Trainer:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)

    work = tmp_path / "M2.work"
    (work / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "M2.work.deleting").mkdir()  # left by a kill during an earlier removal
    out = finish(Trainer, AutoTokenizer.from_pretrained(tiny_model), tmp_path / "M2", work)
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M2"]


def test_weights_train_in_fp32_when_sampling_is_in_bf16(tiny_model, tmp_path, monkeypatch):
    """model.dtype=auto samples in bf16 on a GPU; trained in bf16, weights would hardly move at the paper's learning
    rates (the steps round away), so SFT and DPO load the weights, and DPO's reference, in fp32 (bf16 is autocast)."""
    import torch
    from trl import DPOTrainer, SFTTrainer

    seen = []
    for trainer in (SFTTrainer, DPOTrainer):
        original = trainer.__init__

        def spy(self, *args, _original=original, **kwargs):
            seen.append((kwargs["model"].dtype, kwargs.get("ref_model") and kwargs["ref_model"].dtype))
            _original(self, *args, **kwargs)

        monkeypatch.setattr(trainer, "__init__", spy)
    config = tiny_config(tiny_model, "model.dtype=bfloat16", "sft.epochs=1", "sft.save_steps=100", "dpo.save_steps=100")
    ift = [IFTExample(id="a", prompt="Name a colour.", response="Blue.")]
    train_sft(tiny_model, ift, [], tmp_path / "M1", config)
    pairs = [Pair(id="p", prompt_id="q", prompt=ift[0].prompt, chosen_id="c", rejected_id="r", chosen="Blue.",
                  rejected="Colours are many.", chosen_score=4, rejected_score=1)]
    train_dpo(tmp_path / "M1", pairs, tmp_path / "M2", config, reference_path=tiny_model)
    assert seen == [(torch.float32, None), (torch.float32, torch.float32)]


def test_only_the_main_process_publishes_and_all_wait_for_it(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srlm.training import finish

    events = []

    class Accelerator:
        def __init__(self, main):
            self.is_main_process = main

        def wait_for_everyone(self):
            events.append("barrier")

    class Trainer:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    work = tmp_path / "M2.work"
    work.mkdir()
    Trainer.accelerator = Accelerator(main=False)
    finish(Trainer, tokenizer, tmp_path / "M2", work)
    assert events == ["barrier", "barrier"] and not (tmp_path / "M2").exists() and work.exists()
    Trainer.accelerator = Accelerator(main=True)
    finish(Trainer, tokenizer, tmp_path / "M2", work)
    assert (tmp_path / "M2" / "model.safetensors").exists() and not work.exists()


def test_one_process_trains_on_one_gpu_whatever_it_sees(tmp_path, monkeypatch):
    """Without `accelerate launch`, transformers would use nn.DataParallel over every visible GPU, which TRL refuses
    at its first training stage (and which would multiply the batch)."""
    from trl import DPOConfig, SFTConfig

    from srlm.config import RunConfig
    from srlm.training import trainer_config, training_arguments

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for cls, section in ((SFTConfig, RunConfig().sft), (DPOConfig, RunConfig().dpo)):
        assert cls(**training_arguments(section, work_dir=tmp_path, device="cuda", seed=0)).n_gpu == 2  # unchecked
        args = trainer_config(cls, section, work_dir=tmp_path, device="cuda", seed=0)
        assert args.n_gpu == 1
        assert args.train_batch_size == section.micro_batch_size


def test_a_separate_reference_is_let_go_before_training(tiny_model, tmp_path, monkeypatch):
    """Its log-probabilities are computed when the trainer is built: keeping it would hold a second fp32 copy of the
    weights through the stage."""
    import gc
    import shutil
    import weakref

    from trl import DPOTrainer

    from srlm import models

    loaded, load = [], models.load_model  # weak references to each model loaded: the policy, then the reference

    def load_weakly_held(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    alive_when_training, train = [], DPOTrainer.train

    def spy(self, *args, **kwargs):
        gc.collect()
        alive_when_training.append([ref() is not None for ref in loaded])
        return train(self, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_weakly_held)
    monkeypatch.setattr(DPOTrainer, "train", spy)
    shutil.copytree(tiny_model, tmp_path / "M1")
    pairs = [Pair(id="p", prompt_id="q", prompt="Name a colour.", chosen_id="c", rejected_id="r", chosen="Blue.",
                  rejected="Colours are many.", chosen_score=4, rejected_score=1)]
    out = train_dpo(tiny_model, pairs, tmp_path / "M2", tiny_config(tiny_model, "dpo.epochs=1", "dpo.save_steps=100"),
                    reference_path=tmp_path / "M1")
    assert alive_when_training == [[True, False]]  # the policy trains; the reference is gone
    assert (out / "config.json").exists()


def test_checkpoints_resume_only_what_they_were_trained_from(tiny_model, tmp_path, monkeypatch):
    # A killed `srlm sft` rerun on other data resumed the old checkpoint and finished on the new: a model of neither.
    from srlm.errors import RunDirError
    from srlm.training import pin_training

    config = tiny_config(tiny_model)
    work = tmp_path / "M1.work"
    rows = [{"prompt": "Q", "completion": "A"}]
    pin_training(work, "sft", config, rows, model=tiny_model)
    pin_training(work, "sft", config, list(rows), model=tiny_model)  # the same again: resumes
    with pytest.raises(RunDirError, match=r"M1.work: holds the checkpoints of a SFT stage made with other settings "
                                          r"\(rows: '1, sha256:.*' -> '2, sha256:.*'\)"):
        pin_training(work, "sft", config, rows * 2, model=tiny_model)
    other = config.model_copy(update={"sft": config.sft.model_copy(update={"learning_rate": 1e-3})})
    with pytest.raises(RunDirError, match=r"sft.learning_rate"):
        pin_training(work, "sft", other, rows, model=tiny_model)
    monkeypatch.setenv("RANK", "1")  # under accelerate launch, rank 0 checks for all
    pin_training(work, "sft", other, rows, model=tiny_model)


def test_overlong_rows_are_left_out_and_counted_not_cut(tiny_model, capsys):
    # TRL cut a DPO pair's chosen and rejected responses at different points (and dropped a pair whose prompt alone was
    # too long) without a word; srlm leaves such rows out and says how many.
    from srlm.config import ModelConfig
    from srlm.dpo import dpo_rows
    from srlm.errors import InputError
    from srlm.models import load_tokenizer
    from srlm.records import Pair
    from srlm.training import drop_overlong

    tokenizer = load_tokenizer(tiny_model, ModelConfig())
    pair = lambda i, chosen: Pair(id=f"p{i}", prompt_id=f"q{i}", prompt="Name a colour.", chosen_id="a", rejected_id="b",
                                  chosen=chosen, rejected="Blue.", chosen_score=4.0, rejected_score=1.0)
    rows = dpo_rows([pair(0, "Red."), pair(1, "Red, " * 200), pair(2, "Green.")])
    kept = drop_overlong(rows, tokenizer, 64, "dpo", ("chosen", "rejected"))
    assert [r["chosen"][0]["content"] for r in kept] == ["Red.", "Green."]
    assert "[srlm] dpo: 1 of 3 pairs are longer than dpo.max_length=64 tokens and are left out" in capsys.readouterr().err
    with pytest.raises(InputError, match="every DPO pair is longer than dpo.max_length=8 tokens"):
        drop_overlong(rows, tokenizer, 8, "dpo", ("chosen", "rejected"))


def test_a_saved_model_keeps_its_own_dropout_not_the_training_one(tiny_model, tmp_path):
    # M1-M3 were published with attention_dropout 0.1: fine-tuned elsewhere, they would train with dropout silently.
    import json

    from srlm.config import ModelConfig
    from srlm.models import load_model, load_tokenizer, save_checkpoint

    before = json.loads((tiny_model / "config.json").read_text()).get("attention_dropout", 0.0)
    model = load_model(tiny_model, ModelConfig(), "cpu", dropout=0.1)
    assert model.config.attention_dropout == 0.1 != before
    out = save_checkpoint(model, load_tokenizer(tiny_model, ModelConfig()), tmp_path / "M2")
    assert json.loads((out / "config.json").read_text())["attention_dropout"] == before
    assert model.config.attention_dropout == 0.1  # the model in training is left as it was


def test_a_model_saved_over_another_is_never_half_of_either_under_its_name(tiny_model, tmp_path, monkeypatch):
    # The old model was removed in place before the new one was renamed there: a kill during the removal left some
    # of its files under the final name, which looks complete (no .saving, no .work).
    import os

    from srlm import models
    from srlm.config import ModelConfig

    model, tokenizer = models.load_model(tiny_model, ModelConfig(), "cpu"), models.load_tokenizer(tiny_model, ModelConfig())
    out = models.save_checkpoint(model, tokenizer, tmp_path / "M2")
    real = os.replace

    def killed_after_the_first(src, dst):
        real(src, dst)
        raise KeyboardInterrupt  # the kill, right after the old model went aside

    monkeypatch.setattr(models.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        models.save_checkpoint(model, tokenizer, out)
    assert not out.exists() and (tmp_path / "M2.saving" / "model.safetensors").exists()
    monkeypatch.setattr(models.os, "replace", real)
    models.save_checkpoint(model, tokenizer, out)  # the rerun publishes, and the old copy goes
    assert (out / "model.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["M2"]
