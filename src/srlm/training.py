"""What the SFT and DPO stages share: TrainingArguments from our config, and checkpoint-based resume.

Both stages train with TRL on accelerate (so the same code runs on a CPU, one GPU, or, launched with
`accelerate launch`, many). A stage trains in `<out>.work/`, keeps Trainer checkpoints there every
`save_steps` (the resume point after a crash), and publishes the final model to `<out>` by rename.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

# Weights train in fp32 whatever model.dtype samples in: AdamW's steps at the paper's learning rates (1e-7 to 5.5e-6)
# are below bf16's spacing near weights of ~0.04 (1.5e-4), so bf16 weights would hardly move. bf16 comes in as
# autocast over the fp32 weights (sft.bf16 / dpo.bf16).
TRAINING_DTYPE = "float32"


def trainer_config(cls, section, *, work_dir: Path, device: str, seed: int, **overrides):
    """TRL's `cls` (SFTConfig or DPOConfig) from an `sft` or `dpo` config section (`training_arguments`) and
    `overrides`, for one process on one device.

    Launched without `accelerate launch` on a machine with several GPUs, transformers would wrap the model in
    nn.DataParallel over all of them, which TRL refuses (and which would multiply the batch): train on the one the
    model was loaded on, as transformers itself does for a model spread over devices."""
    args = cls(**{**training_arguments(section, work_dir=work_dir, device=device, seed=seed), **overrides})
    if args.n_gpu > 1:
        args._n_gpu = 1
    return args


def training_arguments(section, *, work_dir: Path, device: str, seed: int) -> dict:
    """Keyword arguments for a TRL config (SFTConfig / DPOConfig) from an `sft` or `dpo` config section."""

    from .rundir import first_process

    # section.batch_size is the batch of one optimizer step over every process (PAPER.md §4: 16), so under
    # `accelerate launch` on several GPUs each accumulates its share, not the whole.
    processes = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    largest = min(section.micro_batch_size, max(1, section.batch_size // processes))
    # The micro-batch whose step comes nearest the batch (exactly, where the processes can split it evenly), the
    # largest of those that do.
    step_of = lambda m: m * processes * max(1, math.ceil(section.batch_size / (m * processes)))
    micro = min(range(largest, 0, -1), key=lambda m: step_of(m) - section.batch_size)
    accumulation = max(1, math.ceil(section.batch_size / (micro * processes)))
    if (step := micro * accumulation * processes) != section.batch_size and first_process():
        import sys

        print(f"[srlm] {work_dir.name}: a step is {step} examples ({processes} processes x {micro} x {accumulation} "
              f"accumulated), not batch_size={section.batch_size}, which {processes} processes cannot split evenly; "
              "choose a batch_size divisible by the number of processes", file=sys.stderr)
    from .models import cpu_has_native_bf16, gpu_has_native_bf16

    bf16 = section.bf16
    if bf16 == "auto":
        bf16 = gpu_has_native_bf16() if device == "cuda" else cpu_has_native_bf16()
    return dict(
        output_dir=str(work_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=section.learning_rate,
        # PAPER.md §4: the LR decays from its peak to a floor (5.5e-6 -> 1.1e-6 SFT, 1e-6 -> 1e-7 DPO).
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": section.min_learning_rate},
        num_train_epochs=section.epochs,
        max_length=section.max_length,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=1,
        logging_steps=1,
        report_to=[],
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
        # TRL turns checkpointing on by default; it costs ~30% more compute, which small models do not need.
        **{checkpointing_field(): section.gradient_checkpointing},
    )


def checkpointing_field() -> str:
    """The TrainingArguments field that turns activation checkpointing on: transformers 5.25 renamed
    `gradient_checkpointing` to `activation_checkpointing` (the old name warns, and goes in v6)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


@contextlib.contextmanager
def scored_positions_only():
    """While this is open, TRL's fused LM head projects only the positions that have a label, on a CPU too.

    SFT and DPO score each labelled position with TRL's fused LM head: a vocabulary-wide projection (49152 columns
    for SmolLM2) and its backward. TRL projects only the labelled positions where it has Triton (CUDA, XPU) and
    every position elsewhere, to give compilers such as Neuron's fixed shapes; in eager PyTorch on a CPU the fixed
    shape buys nothing and the unlabelled positions are pure waste: the prompt of every example (loss on responses
    only, PAPER.md §4), which in an EFT example is the whole judge prompt, about 85% of its tokens. The labelled
    positions give the same log-probabilities either way (tests/test_training.py), and SFT runs 1.3-1.4x and DPO
    1.2x faster on a CPU (bench/speed.py). TRL decides this in `trl.trainer.utils` through `_use_triton`, which it
    uses for nothing else there; where a TRL version lacks it, training runs as TRL has it.
    """
    from trl.trainer import utils

    decide = getattr(utils, "_use_triton", None)
    if decide is None:
        yield
        return
    utils._use_triton = lambda device: device.type == "cpu" or decide(device)
    try:
        yield
    finally:
        utils._use_triton = decide


def last_checkpoint(work_dir: Path) -> str | None:
    """The newest *complete* Trainer checkpoint in work_dir, or None to start from scratch.

    A kill during a save leaves a checkpoint directory without its trainer state (the Trainer writes it
    last), or with a torn one; such a directory is removed rather than resumed from.
    """
    if not work_dir.is_dir():
        return None
    candidates = sorted((p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in candidates:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            if any(checkpoint.glob("*.safetensors")):
                return str(checkpoint)
        except (OSError, ValueError):
            pass
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def start_stage(section: str, model_path: Path | str, out_dir: Path, config, rows: list[dict],
                completions: tuple[str, ...], **models: Path | str | None):
    """What a training stage does before it loads a model: the device, the work directory beside `out_dir`, the
    tokenizer, the rows that fit `max_length` (drop_overlong), and the work directory pinned to them (pin_training).
    `models`: the models besides `model_path` the stage trains from (a DPO reference)."""
    from .models import load_tokenizer, pick_device

    tokenizer = load_tokenizer(model_path, config.model)
    rows = drop_overlong(rows, tokenizer, getattr(config, section).max_length, section, completions)
    work_dir = work_dir_of(out_dir)
    pin_training(work_dir, section, config, rows, model=model_path, **models)
    return pick_device(config.device), work_dir, tokenizer, rows


def drop_overlong(rows: list[dict], tokenizer, max_length: int, stage: str, completions: tuple[str, ...]) -> list[dict]:
    """Leave out (and count on stderr) the rows whose prompt with any of its `completions` is over `max_length`
    tokens, rather than let TRL cut them: an SFT example's EFT target would lose its "Score: N"; a DPO pair would be
    dropped without a word when its prompt is too long, or else have its chosen and rejected responses cut at
    different points and compared over spans of different lengths."""
    import sys

    from .errors import InputError

    def length(row: dict) -> int:
        return max(len(tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=True)["input_ids"])
                   for key in completions)

    kept = [r for r in rows if length(r) <= max_length]
    unit = "pairs" if stage == "dpo" else "examples"
    if len(kept) < len(rows):
        print(f"[srlm] {stage}: {len(rows) - len(kept)} of {len(rows)} {unit} are longer than {stage}.max_length="
              f"{max_length} tokens and are left out", file=sys.stderr)
    if not kept:
        raise InputError(f"every {stage.upper()} {unit[:-1]} is longer than {stage}.max_length={max_length} tokens; "
                         "raise it")
    return kept


def pin_training(work_dir: Path, section: str, config, rows: list, **models: Path | str | None) -> None:
    """Tie a training stage's checkpoints in `work_dir` to what they were trained from: the models' weights, the
    rows, and the settings. A killed `srlm sft` rerun on other data (or another model, or other settings) resumed
    the old checkpoint and finished on the new data, a model of neither; now it is refused.

    Under `accelerate launch` rank 0 writes and checks for all (the ranks train on the same)."""
    import hashlib

    from .config import flat_keys
    from .models import fingerprint
    from .rundir import first_process, pin_settings

    if not first_process():
        return
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    settings = {name: fingerprint(path) for name, path in models.items() if path is not None}
    settings.update(rows=f"{len(rows)}, sha256:{digest}", **flat_keys(config, ["seed", "model", section]))
    work_dir.mkdir(parents=True, exist_ok=True)
    pin_settings(work_dir / "srlm-settings.json", settings, f"the checkpoints of a {section.upper()} stage",
                 holder=work_dir, start_over=f"delete {work_dir.name} to start over")


def work_dir_of(out_dir: Path) -> Path:
    """Where a training stage that publishes `out_dir` keeps its checkpoints until then."""
    return out_dir.with_name(out_dir.name + ".work")


def discard(work_dir: Path) -> None:
    """Remove a work directory, renamed first, so that a kill during the removal cannot leave a half-deleted
    checkpoint there for a rerun to resume from."""
    trash = work_dir.with_name(work_dir.name + ".deleting")
    shutil.rmtree(trash, ignore_errors=True)
    if work_dir.exists():
        os.replace(work_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def finish(trainer, tokenizer, out_dir: Path, work_dir: Path) -> Path:
    """Publish the trained model to `out_dir`, then remove the work directory (`discard`)."""
    from .models import save_checkpoint

    # Under `accelerate launch` every process gets here: one publishes, after all have finished training, and the
    # others wait for it, so that none reads or removes what another is writing.
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if accelerator is None or accelerator.is_main_process:
        save_checkpoint(trainer.model, tokenizer, out_dir)
        discard(work_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return out_dir
