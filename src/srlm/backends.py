"""The one generation interface every sampling stage uses, and its backends.

A stage hands a backend a list of requests (chat messages, or raw text to continue) and one
`SamplingParams`; it gets back one `Completion` per request, in order. Stages never know which backend
runs (STYLE.md: the vLLM `LLM.generate(prompts, SamplingParams)` shape).

Batches are planned by the stage (`plan_batches`) rather than inside the backend, so a stage can write
each batch's records as soon as they exist and, after a crash, skip the batches already written. Each
batch is sampled under its own seed, so a resumed run produces the same records as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar, Union

Request = Union[str, list[dict]]  # raw text to continue, or chat messages (chat template applied)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()  # cut the text at the first of these (and stop sampling there)


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    truncated: bool  # hit max_new_tokens without an end-of-sequence or a stop string


class Generator(Protocol):
    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]: ...


T = TypeVar("T")


def plan_batches(items: Sequence[T], length: Callable[[T], int], batch_size: int) -> list[list[T]]:
    """Group items of similar length (less padding), in a fixed order that does not depend on what is done."""
    ordered = sorted(items, key=length)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def request_length(request: Request) -> int:
    if isinstance(request, str):
        return len(request)
    return sum(len(m.get("content", "")) for m in request)


def batch_params(params: SamplingParams, batch_index: int) -> SamplingParams:
    # One seed per batch, derived from the run seed: resuming at any batch reproduces the same samples.
    return replace(params, seed=params.seed * 1_000_003 + batch_index)


class HFGenerator:
    """transformers backend: batched `model.generate` with left padding, on CPU or GPU."""

    def __init__(self, model_path: Path | str, model_config, device: str, batch_size: int = 16):
        from .models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_path, model_config)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_path, model_config, device).eval()
        self.device = device
        self.batch_size = batch_size
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos

    def render(self, request: Request) -> str:
        if isinstance(request, str):
            return request
        return self.tokenizer.apply_chat_template(request, tokenize=False, add_generation_prompt=True)

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        import torch

        texts = [self.render(r) for r in requests]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[Completion | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            torch.manual_seed(params.seed + start)
            sample = params.temperature > 0
            with torch.inference_mode():
                out = self.model.generate(
                    **enc,
                    do_sample=sample,
                    temperature=params.temperature if sample else None,
                    top_p=params.top_p if sample else None,
                    top_k=None,
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.eos_ids,
                    stop_strings=list(params.stop) or None,
                    tokenizer=self.tokenizer if params.stop else None,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for row, i in enumerate(idx):
                results[i] = self._completion(new_tokens[row].tolist(), params)
        return results  # type: ignore[return-value]

    def _completion(self, tokens: list[int], params: SamplingParams) -> Completion:
        ended = False
        for j, tok in enumerate(tokens):
            if tok in self.eos_ids:
                tokens, ended = tokens[:j], True
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, ended = text[:cut], True
        return Completion(text=text.strip(), n_tokens=len(tokens), truncated=not ended)


def make_generator(config, model_path: Path | str) -> Generator:
    from .models import pick_device

    device = pick_device(config.device)
    if config.generation.backend == "hf":
        return HFGenerator(model_path, config.model, device, config.generation.batch_size)
    raise ValueError(f"unknown backend {config.generation.backend!r}")  # unreachable: validated by config
