"""DPO (PAPER.md §4.5): M(t+1) is M(t) trained on AIFT(M(t)), the pairs M(t) made and judged itself.

The reference model is M(t) (the paper) or, with `dpo.reference: m1`, a fixed M1. Reference
log-probabilities are computed once before training (they never change), not at every step; the M(t) reference
is the policy's own starting weights, and an M1 reference is let go once they are computed. Resumable from the last
Trainer checkpoint in `<out>.work/`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .allocator import release_gpu_memory, tensor_stage
from .records import Pair


def dpo_rows(pairs: Sequence[Pair]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": p.prompt}],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in pairs
    ]


def _drop_reference(trainer) -> None:
    """Let go of a separate reference model once TRL has computed its log-probabilities (in its constructor): TRL
    and accelerate keep it for the stage otherwise, a second copy of the weights in fp32 beside the policy's."""
    import gc

    reference, trainer.ref_model = trainer.ref_model, None
    models = getattr(trainer.accelerator, "_models", None)
    if isinstance(models, list):
        models[:] = [m for m in models if m is not reference]
    del reference
    gc.collect()
    release_gpu_memory()


@tensor_stage
def train_dpo(
    model_path: Path | str,
    pairs: Sequence[Pair],
    out_dir: Path,
    config,
    *,
    reference_path: Path | str | None = None,
) -> Path:
    """Train M(t+1) from `model_path` = M(t) on `pairs`; save to `out_dir`. Reference: `reference_path` or M(t)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from .models import load_model
    from .training import TRAINING_DTYPE, finish, last_checkpoint, scored_positions_only, start_stage, trainer_config

    if not pairs:
        raise ValueError("DPO needs at least one preference pair")
    device, work_dir, tokenizer, rows = start_stage("dpo", model_path, out_dir, config, dpo_rows(pairs),
                                                    ("chosen", "rejected"), reference=reference_path)
    model = load_model(model_path, config.model, device, dropout=config.dpo.dropout, dtype=TRAINING_DTYPE)
    ref_model = None
    if reference_path is not None and Path(reference_path) != Path(model_path):
        ref_model = load_model(reference_path, config.model, device, dtype=TRAINING_DTYPE).eval()
    args = trainer_config(DPOConfig, config.dpo, work_dir=work_dir, device=device, seed=config.seed,
                          beta=config.dpo.beta, precompute_ref_log_probs=True, disable_dropout=config.dpo.dropout == 0)
    with scored_positions_only():  # the reference log-probabilities too, when TRL computes them at construction
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        if ref_model is not None:
            ref_model = None
            _drop_reference(trainer)
        trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    return finish(trainer, tokenizer, out_dir, work_dir)
