"""Shared fixtures: a tiny randomly initialised chat model (built here, in seconds) and small seed files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(directory: Path, corpus: list[str]) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on `corpus`: real transformers parts, tiny."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _corpus() -> list[str]:
    lines = [(FIXTURES / "short_judge_template.txt").read_text()]
    for name in ("ift.jsonl", "eft.jsonl"):
        for line in (FIXTURES / name).read_text().splitlines():
            lines.extend(str(v) for v in json.loads(line).values())
    return lines


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), _corpus())


@pytest.fixture
def ift_file() -> Path:
    return FIXTURES / "ift.jsonl"


@pytest.fixture
def eft_file() -> Path:
    return FIXTURES / "eft.jsonl"


def tiny_overrides(model: Path, ift: Path, eft: Path) -> list[str]:
    """A config that runs the whole loop on the tiny model in seconds.

    SFT uses a huge LR and many epochs so that even this tiny random model learns to end a judgment with
    "Score: N" (the loop needs parsed scores to make pairs); a short judge template keeps that fast."""
    return [
        f"model.name_or_path={model}", f"data.ift={ift}", f"data.eft={eft}", "device=cpu",
        "sft.learning_rate=0.005", "sft.min_learning_rate=0.002", "sft.epochs=60", "sft.batch_size=8",
        "sft.micro_batch_size=8", "sft.save_steps=5", "sft.max_length=512",
        f"judge.template={FIXTURES / 'short_judge_template.txt'}",
        "prompts.num_prompts=4", "prompts.max_new_tokens=12", "prompts.min_words=1", "prompts.rouge_l_max=0.95",
        "prompts.blocked_keywords=[]", "prompts.max_attempts_factor=8",
        "candidates.n=3", "candidates.max_new_tokens=8", "judge.k=2", "judge.max_new_tokens=16",
        "judge.max_failure_rate=1.0", "generation.batch_size=8",
        "dpo.batch_size=2", "dpo.micro_batch_size=2", "dpo.save_steps=1", "dpo.learning_rate=1e-4",
        "dpo.min_learning_rate=1e-5", "dpo.max_length=256", "iterations=2",
    ]
