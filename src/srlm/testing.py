"""Tiny real models for tests and harnesses: a 2-layer Llama and a byte-level BPE tokenizer trained on the spot.

Everything is a genuine transformers part (config, weights, tokenizer with a chat template), just small
enough that the whole loop runs in seconds on a CPU.
"""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(directory: Path, corpus: list[str], head_dim: int | None = None) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on `corpus`: real transformers parts, tiny.

    `head_dim` overrides the attention head size (16 by default): vLLM's CPU attention needs 32 or more."""
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
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, head_dim=head_dim,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_of_type(tiny_model: Path, model_type: str, directory: Path, sliding_window: int | None = None) -> Path:
    """The tiny model's shapes and tokenizer as another architecture (llama: the tiny model itself), randomly
    initialised; with `sliding_window`, attention over that many tokens only (Mistral's, Qwen2's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model_type == "llama" and sliding_window is None:
        return tiny_model
    base = AutoConfig.from_pretrained(tiny_model).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "head_dim", "pad_token_id", "eos_token_id",
            "bos_token_id", "tie_word_embeddings")
    config = AutoConfig.for_model(model_type, **{k: base[k] for k in keep if base.get(k) is not None})
    # None: full attention (Mistral's default window would otherwise apply).
    config.sliding_window = sliding_window
    if sliding_window is not None and hasattr(config, "use_sliding_window"):
        config.use_sliding_window = True  # Qwen2 reads the window only with this
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(directory)
    return directory


def tiny_overrides(model: Path, ift: Path, eft: Path, template: Path) -> list[str]:
    """A config that runs the whole loop on the tiny model in seconds.

    SFT uses a huge LR and many epochs so that even this tiny random model learns to end a judgment with
    "Score: N" (the loop needs parsed scores to make pairs); a short judge template keeps that fast."""
    return [
        f"model.name_or_path={model}", f"data.ift={ift}", f"data.eft={eft}", "device=cpu",
        "sft.learning_rate=0.005", "sft.min_learning_rate=0.002", "sft.epochs=60", "sft.batch_size=8",
        "sft.micro_batch_size=8", "sft.save_steps=5", "sft.max_length=512",
        f"judge.template={template}",
        # The SFT above leaves the tiny model so sure of itself that at the paper's temperatures its samples are often
        # one text: no pair to learn from among the candidates, and on some CPUs (AMD EPYC) no new prompt at all in
        # iteration 2 (all "3", which iteration 1 kept). Prompts and candidates sample from the whole distribution.
        "prompts.num_prompts=4", "prompts.max_new_tokens=12", "prompts.min_words=1", "prompts.rouge_l_max=0.95",
        "prompts.blocked_keywords=[]", "prompts.max_attempts_factor=8", "prompts.temperature=1.0", "prompts.top_p=1.0",
        "candidates.n=3", "candidates.max_new_tokens=8", "candidates.temperature=1.0", "candidates.top_p=1.0",
        "judge.k=2", "judge.max_new_tokens=16",
        "judge.max_failure_rate=1.0", "generation.batch_size=8",
        "dpo.batch_size=2", "dpo.micro_batch_size=2", "dpo.save_steps=1", "dpo.learning_rate=1e-4",
        "dpo.min_learning_rate=1e-5", "dpo.max_length=256", "iterations=2",
    ]
