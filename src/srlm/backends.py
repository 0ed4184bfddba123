"""The one generation interface every sampling stage uses, and its backends.

A stage hands a backend a list of requests (chat messages, or raw text to continue) and one
`SamplingParams`; it gets back one `Completion` per request, in order. Stages never know which backend
runs (STYLE.md: the vLLM `LLM.generate(prompts, SamplingParams)` shape).

Batches are planned by the stage (`plan_batches`) rather than inside the backend, so a stage can write
each batch's records as soon as they exist and, after a crash, skip the batches already written. Each
batch is sampled under its own seed, so a resumed run produces the same records as an uninterrupted one.
"""
from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar, Union

from .errors import ModelError

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
        self._prefix_cache: tuple[list[int], object] | None = None

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

    def choice_probs(self, requests: Sequence[Request], prefill: str | Sequence[str], choices: Sequence[str], *,
                     reuse_prefix: bool = True) -> list[list[float]]:
        """P(choice | request, prefill) for each choice: one forward pass per batch, no sampling.

        `prefill` opens the assistant's turn (the judge's "Score:"). The choices may share leading tokens
        (" 3" is " " + "3" for SmolLM2, one token for Llama 3); the shared tokens are appended to the prompt
        and each choice must then be one token. With `reuse_prefix`, the text all requests begin with (the
        judge rubric, most of a judge prompt) is encoded once and its key/value cache reused by every row.
        """
        import copy

        import torch

        prefills = [prefill] * len(requests) if isinstance(prefill, str) else list(prefill)
        texts = [self.render(r) + p for r, p in zip(requests, prefills)]
        if not texts:
            return []
        shared, choice_ids = self._choice_tokens(texts[0], choices)
        prefix, rows = self._split_prefix(texts) if reuse_prefix else ([], None)
        if rows is None:
            rows = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        rows = [r + shared for r in rows]
        cache = None
        with torch.inference_mode():
            if prefix:
                # Batches of one stage share the rubric: encode it once per stage, not once per batch.
                if self._prefix_cache is None or self._prefix_cache[0] != prefix:
                    encoded = self.model(torch.tensor([prefix], device=self.device), use_cache=True)
                    self._prefix_cache = (prefix, encoded.past_key_values)
                cache = self._prefix_cache[1]
            out: list[list[float] | None] = [None] * len(rows)
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                width = max(len(rows[i]) for i in idx)
                pad = self.tokenizer.pad_token_id
                # Left padding keeps every row's last token in the last column (one column of logits); the
                # pads sit between the cached prefix and the row, masked, with positions that skip them.
                ids = torch.tensor([[pad] * (width - len(rows[i])) + rows[i] for i in idx], device=self.device)
                mask = torch.tensor([[0] * (width - len(rows[i])) + [1] * len(rows[i]) for i in idx],
                                    device=self.device)
                positions = len(prefix) + (mask.cumsum(-1) - 1).clamp(min=0)
                kwargs = {}
                if cache is not None:
                    batch_cache = copy.deepcopy(cache)
                    batch_cache.batch_repeat_interleave(len(idx))
                    kwargs["past_key_values"] = batch_cache
                    mask = torch.cat([torch.ones(len(idx), len(prefix), dtype=mask.dtype, device=self.device), mask],
                                     dim=-1)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                                    use_cache=cache is not None, **kwargs).logits[:, -1].float()
                probs = torch.softmax(logits, dim=-1)[:, choice_ids]
                for row, i in enumerate(idx):
                    out[i] = probs[row].tolist()
        return out  # type: ignore[return-value]

    def _choice_tokens(self, text: str, choices: Sequence[str]) -> tuple[list[int], list[int]]:
        encode = lambda t: self.tokenizer(t, add_special_tokens=False).input_ids
        base = encode(text)
        tails = []
        for choice in choices:
            full = encode(text + choice)
            if full[: len(base)] != base:
                raise ValueError(f"the tokenizer merges {choice!r} into the text before it; cannot score choices")
            tails.append(full[len(base) :])
        shared: list[int] = []
        while all(len(t) > 1 for t in tails) and len({t[0] for t in tails}) == 1:
            shared.append(tails[0][0])
            tails = [t[1:] for t in tails]
        if any(len(t) != 1 for t in tails) or len({t[0] for t in tails}) != len(tails):
            raise ValueError(f"choices {list(choices)} are not one distinct token each after a shared start")
        return shared, [t[0] for t in tails]

    def _split_prefix(self, texts: list[str]) -> tuple[list[int], list[list[int]] | None]:
        """The token ids of the text every request starts with, and of each request's rest; (no prefix, None)
        when that does not pay. The cut is after a newline, and only where encoding the two parts apart gives
        the same tokens as encoding the whole (byte-level BPE merges runs of whitespace across a cut)."""
        import os.path

        encode = lambda t: self.tokenizer(t, add_special_tokens=False).input_ids
        whole = [encode(t) for t in texts]
        common = os.path.commonprefix(texts)
        cut = len(common)
        for _ in range(8):
            cut = common.rfind("\n", 0, cut)
            if cut < 0:
                break
            prefix = encode(common[: cut + 1])
            if len(prefix) < 16:
                break
            rows = [encode(t[cut + 1 :]) for t in texts]
            if all(w == prefix + r for w, r in zip(whole, rows)):
                return prefix, rows
        return [], None


class OpenAIGenerator:
    """Any OpenAI-compatible server: vLLM `serve`, llama.cpp `llama-server`, TGI, SGLang, OpenAI itself.

    Chat requests go to `POST {base_url}/chat/completions` (the server applies the model's chat template),
    raw text to `POST {base_url}/completions`. Up to `concurrency` requests are in flight at once; results
    come back in request order. Connection errors, timeouts, 429 and 5xx are retried with exponential
    backoff (a busy or restarting server heals); any other HTTP error (400 bad request, 401/403 bad key, 404
    wrong URL or model) raises ModelError at once with the URL and the server's own message, since sending
    the same request again cannot fix it. Standard library only.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 300.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        # Absent key is fine: local servers (vLLM, llama.cpp) run without one by default.
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        if not requests:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)))
        try:
            futures = [pool.submit(self._complete, r, params, i) for i, r in enumerate(requests)]
            return [f.result() for f in futures]
        finally:
            # After a failure, requests not yet sent are dropped instead of queued against a broken server.
            pool.shutdown(wait=True, cancel_futures=True)

    def _complete(self, request: Request, params: SamplingParams, index: int) -> Completion:
        chat = not isinstance(request, str)
        body: dict = {
            "model": self.model,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            # One seed per request, not per batch: a server seeds each request alone, so the N identical
            # requests of a candidates batch would otherwise come back as N identical samples.
            "seed": (params.seed * 1_000_003 + index) % 2**31,
            "n": 1,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if chat:
            url, body["messages"] = f"{self.base_url}/chat/completions", list(request)
        else:
            url, body["prompt"] = f"{self.base_url}/completions", request
        data = self._post(url, body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            field = "choices[0].message.content" if chat else "choices[0].text"
            raise ModelError(f"{url}: unexpected response without {field}: {json.dumps(data)[:300]}")
        text = text or ""
        stopped = False
        # Servers differ on stop strings (some keep the stop text, some ignore `stop` on /completions): cut here too.
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, stopped = text[:cut], True
        usage = data.get("usage") or {}
        n_tokens = usage.get("completion_tokens")
        if not isinstance(n_tokens, int):
            n_tokens = len(text.split())  # a server that reports no usage: words are the closest stand-in
        truncated = choice.get("finish_reason") == "length" and not stopped
        return Completion(text=text.strip(), n_tokens=n_tokens, truncated=truncated)

    def _post(self, url: str, body: dict) -> dict:
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = 0.0
            try:
                request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code not in (408, 429) and e.code < 500:
                    raise ModelError(f"{url}: HTTP {e.code}{self._hint(e.code)}; the server said: {message}")
                last = f"HTTP {e.code}: {message}"
                wait = _retry_after(e)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                last = self._describe(e)
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ModelError(f"{url}: the server's answer is not JSON: {raw[:300]!r}")
            if attempt < self.max_retries:
                time.sleep(min(self.max_backoff_s, max(wait, self.backoff_s * 2**attempt)))
        raise ModelError(f"{url}: no answer after {self.max_retries + 1} attempt(s) "
                         f"(generation.max_retries={self.max_retries}); last error: {last}")

    def _hint(self, code: int) -> str:
        if code in (401, 403):
            where = f"${self.api_key_env}" if self.api_key_env else "the API key"
            return f" (check the API key in {where}{'' if self.api_key else ', which is not set'})"
        if code == 404:
            return f" (check generation.base_url, which usually ends in /v1, and the model name {self.model!r})"
        return ""

    def _describe(self, error: Exception) -> str:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError) or isinstance(error, TimeoutError):
            return f"timed out after {self.timeout_s:g} s (generation.timeout_s)"
        return f"cannot reach the server ({reason})"


def _server_message(error: urllib.error.HTTPError) -> str:
    """The server's own explanation: OpenAI's {"error": {"message"}}, vLLM's {"message"}, FastAPI's {"detail"}."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or "(no message)"
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.strip()[:500] or str(error.reason)
    if isinstance(data, dict):
        found = data.get("error")
        if isinstance(found, dict):
            found = found.get("message")
        found = found or data.get("message") or data.get("detail")
        if found:
            return str(found)[:500]
    return raw.strip()[:500]


def _retry_after(error: urllib.error.HTTPError) -> float:
    try:
        return float(error.headers.get("Retry-After", 0))
    except (TypeError, ValueError):
        return 0.0


def make_generator(config, model_path: Path | str) -> Generator:
    """The configured backend for one model: `model_path` is loaded (hf) or named to the server (openai)."""
    g = config.generation
    if g.backend == "openai":
        return OpenAIGenerator(g.base_url, g.model or str(model_path), api_key_env=g.api_key_env,
                               concurrency=g.concurrency, timeout_s=g.timeout_s, max_retries=g.max_retries)
    from .models import pick_device

    if g.backend == "hf":
        return HFGenerator(model_path, config.model, pick_device(config.device), g.batch_size)
    raise ValueError(f"unknown backend {g.backend!r}")  # unreachable: validated by config
