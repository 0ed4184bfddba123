"""SFT (PAPER.md §2): M0 fine-tuned on IFT + EFT gives M1 (on IFT alone: the SFT baseline).

IFT examples train the answer to a prompt; EFT examples train the judgment of a (prompt, response) pair,
asked with the judge prompt (PAPER.md §3). Loss is on the response tokens only (PAPER.md §4).
Resumable: restarts from the last Trainer checkpoint in `<out>.work/`; `<out>` appears only when done.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from .allocator import tensor_stage
from .judging import PAPER_TEMPLATE, judge_request
from .records import EFTExample, IFTExample


def sft_rows(ift: Sequence[IFTExample], eft: Sequence[EFTExample], template: str = PAPER_TEMPLATE,
             seed: int = 0) -> list[dict]:
    """Conversational prompt-completion rows (TRL's format), IFT and EFT shuffled together."""
    rows = [
        {"prompt": [{"role": "user", "content": x.prompt}], "completion": [{"role": "assistant", "content": x.response}]}
        for x in ift
    ] + [
        {"prompt": judge_request(template, x.prompt, x.response),
         "completion": [{"role": "assistant", "content": x.judgment}]}
        for x in eft
    ]
    random.Random(seed).shuffle(rows)
    return rows


@tensor_stage
def train_sft(
    model_path: Path | str,
    ift: Sequence[IFTExample],
    eft: Sequence[EFTExample],
    out_dir: Path,
    config,
    *,
    template: str = PAPER_TEMPLATE,
) -> Path:
    """Train M1 from `model_path` on IFT+EFT and save it to `out_dir` (HF layout, safetensors)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from .models import load_model
    from .training import TRAINING_DTYPE, finish, last_checkpoint, scored_positions_only, start_stage, trainer_config

    # Too long an example is left out: truncation would cut an EFT target before its "Score: N", teaching the judge
    # to stop without a verdict.
    device, work_dir, tokenizer, rows = start_stage("sft", model_path, out_dir, config,
                                                    sft_rows(ift, eft, template, config.seed), ("completion",))
    model = load_model(model_path, config.model, device, dropout=config.sft.dropout, dtype=TRAINING_DTYPE)
    padding_free = config.sft.padding_free
    if padding_free == "auto":
        padding_free = model.config._attn_implementation.startswith("flash_attention")
    # TRL refuses padding_free with a max_length it cannot enforce; drop_overlong has enforced it already.
    unbounded = {"max_length": None} if padding_free else {}
    args = trainer_config(SFTConfig, config.sft, work_dir=work_dir, device=device, seed=config.seed,
                          completion_only_loss=True, padding_free=padding_free, **unbounded)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    with scored_positions_only():
        trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    return finish(trainer, tokenizer, out_dir, work_dir)
