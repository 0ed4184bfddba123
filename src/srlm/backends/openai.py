"""Any OpenAI-compatible server as a backend: vLLM `serve`, llama.cpp `llama-server`, TGI, SGLang, OpenAI."""
from __future__ import annotations

import http.client
import json
import os
import queue
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..errors import ModelError
from ..progress import tokens_sampled
from . import Completion, Request, SamplingParams
from .hf import cut_at_stop


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
                 max_backoff_s: float = 60.0, count_tokens: Callable[[str], int] | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        # Absent key is fine: local servers (vLLM, llama.cpp) run without one by default.
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")  # no worker would ever answer
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # The served model's tokenizer, where its files are here too: what the server reports counts text cut off
        # at a stop string (servers that ignore `stop`), and some servers report nothing.
        self.count_tokens = count_tokens

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        if not requests:
            return []
        # Daemon workers rather than a ThreadPoolExecutor: after the first error is raised, a request still in flight
        # may take up to timeout_s, and an executor's threads would hold the interpreter's exit that long.
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(requests)):
            todo.put(i)
        done: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, self._complete(requests[i], params, i, stop), None))
                except BaseException as e:  # noqa: BLE001 (handed to the caller's thread, which raises it)
                    done.put((i, None, e))
                    return

        results: list[Completion | None] = [None] * len(requests)
        try:
            # Started inside the try: if a thread cannot start, those that did are stopped too.
            for _ in range(min(self.concurrency, len(requests))):
                threading.Thread(target=work, name="srlm-openai", daemon=True).start()
            for _ in range(len(requests)):
                i, completion, error = done.get()
                if error is not None:
                    raise error
                if self.count_tokens is not None and completion.token_logprobs is None:
                    # Here, not in the workers: a tokenizer is not safe to call from several threads at once.
                    completion = replace(completion, n_tokens=self.count_tokens(completion.text))
                results[i] = completion
                tokens_sampled(completion.n_tokens)  # in this thread, where the progress bar is found
        finally:
            # The first error (or Ctrl-C) is raised at once: requests not yet sent are dropped, and retries waiting
            # to resend give up, instead of being queued against a broken server.
            stop.set()
        return results

    def _complete(self, request: Request, params: SamplingParams, index: int,
                  stop: threading.Event | None = None) -> Completion:
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
        if params.logprobs:
            # The chat API takes a switch; the legacy completions API a count of alternatives (1: the least every
            # server accepts), and reports the sampled token's own either way.
            body["logprobs"] = True if chat else 1
        if chat:
            url, body["messages"] = f"{self.base_url}/chat/completions", list(request)
        else:
            url, body["prompt"] = f"{self.base_url}/completions", request
        data = self._post(url, body, stop)
        field = "choices[0].message.content" if chat else "choices[0].text"
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"{url}: unexpected response without {field}: {json.dumps(data)[:300]}")
        if not isinstance(text, (str, type(None))):
            raise ModelError(f"{url}: {field} is not text: {json.dumps(data)[:300]}")
        # Servers differ on stop strings (some keep the stop text, some ignore `stop` on /completions): cut here too,
        # as the hf backend cuts (at the earliest stop found).
        text, stopped = cut_at_stop(text or "", params.stop)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        n_tokens = usage.get("completion_tokens")
        if not isinstance(n_tokens, int) or (stopped and not params.logprobs):
            # No count, or one of more than the text kept, and no tokenizer here (else `generate` counts): words are
            # the closest stand-in.
            n_tokens = len(text.split())
        truncated = choice.get("finish_reason") == "length" and not stopped
        logprobs = self._logprobs(url, choice, chat) if params.logprobs else None
        return Completion(text=text.strip(), n_tokens=n_tokens, truncated=truncated, token_logprobs=logprobs)

    @staticmethod
    def _logprobs(url: str, choice: dict, chat: bool) -> tuple[float, ...]:
        """Each sampled token's log-probability, as the server reports it (chat: `logprobs.content[].logprob`;
        completions: `logprobs.token_logprobs[]`)."""
        field = "choices[0].logprobs.content[].logprob" if chat else "choices[0].logprobs.token_logprobs[]"
        try:
            block = choice["logprobs"]
            values = [t["logprob"] for t in block["content"]] if chat else list(block["token_logprobs"])
            return tuple(float(v) for v in values)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{url}: logprobs were asked for and the response has no {field} (does this server "
                             f"support logprobs?): {json.dumps(choice)[:300]}")

    def _post(self, url: str, body: dict, stop: threading.Event | None = None) -> dict:
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = 0.0
            try:
                request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
                deadline = time.monotonic() + self.timeout_s
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = _read_before(response, deadline)
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                # 501 and 505 say the server lacks what was asked (llama-server answers 501 for what it does not do).
                if (e.code not in (408, 429) and e.code < 500) or e.code in (501, 505):
                    raise ModelError(f"{url}: HTTP {e.code}{self._hint(e.code)}; the server said: {message}")
                last = f"HTTP {e.code}: {message}"
                wait = _retry_after(e)
            except http.client.InvalidURL as e:  # a bad port in generation.base_url: no retry heals it
                raise ModelError(f"{url}: {e}; check generation.base_url")
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                last = self._describe(e)
                if isinstance(getattr(e, "reason", None), ssl.SSLError):  # https to an http server: no retry heals it
                    raise ModelError(f"{url}: {last}; check generation.base_url (http or https?)")
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ModelError(f"{url}: the server's answer is not JSON: {raw[:300]!r}")
            if attempt < self.max_retries:
                delay = min(self.max_backoff_s, max(wait, self.backoff_s * 2**attempt))
                if stop is not None and stop.wait(delay):
                    raise ModelError(f"{url}: given up after another request of the batch failed; last error: {last}")
                if stop is None:
                    time.sleep(delay)
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


def _read_before(response, deadline: float) -> bytes:
    """The response's body, or TimeoutError once `deadline` has passed: urllib's timeout bounds each socket read, so
    a server (or a proxy) that trickles its answer a few bytes at a time held a request for hours."""
    chunks = []
    while chunk := response.read1(1 << 16):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not arrive in time")
    return b"".join(chunks)


def _server_message(error: urllib.error.HTTPError) -> str:
    """The server's own explanation: OpenAI's {"error": {"message"}}, vLLM's {"message"}, FastAPI's {"detail"}."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):  # a body cut short: the status says enough to retry on
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
