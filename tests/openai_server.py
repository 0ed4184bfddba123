"""A loopback OpenAI-compatible server for tests: the real HTTP API in front of real generation.

`OpenAIServer(generator)` serves `POST /v1/chat/completions` and `POST /v1/completions` on 127.0.0.1 (a free
port) from a thread, answering each request with an srlm `Generator` (e.g. `HFGenerator` on the tiny model),
so the OpenAI backend is checked against real generation rather than canned JSON. `respond=` answers from a
function of the request body instead (a scripted judge whose verdicts a test knows in advance).

Failure switches, for the client's error handling:
- `failures`: HTTP status codes returned, one per request, before normal service resumes ([500] then success);
- `status_for`: a function of the request body giving the HTTP status to fail it with (None: answer it);
- `delay_s`: seconds to wait before answering (a number, or a function of the request body);
- `omit_usage`: answer without the `usage` object, as some servers do.
Asked for `logprobs`, it answers in the API's shape for the route (chat: `logprobs.content`, completions:
`logprobs.token_logprobs`), except with `respond=`, where it answers without them, as a server that lacks them does.
It records every request body and its headers, and the most requests it had in flight at once.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from srlm.backends import Generator, SamplingParams

ROUTES = ("/v1/chat/completions", "/v1/completions")
MESSAGES = {401: "Incorrect API key provided.", 404: "The model does not exist.", 400: "Bad request."}


class OpenAIServer:
    def __init__(self, generator: Generator | None = None, *, respond: Callable[[dict], str] | None = None,
                 model: str = "tiny"):
        if generator is None and respond is None:
            raise ValueError("give a generator or a respond function")
        self.generator = generator
        self.respond = respond
        self.model = model
        self.failures: deque[int] = deque()
        self.status_for: Callable[[dict], int | None] = lambda body: None
        self.delay_s: float | Callable[[dict], float] = 0.0
        self.omit_usage = False
        self.drip_s = 0.0  # > 0: the body is sent a byte at a time, this far apart (a server that trickles)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._state = threading.Lock()
        self._generation = threading.Lock()  # a transformers model is not safe to call from two threads
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> OpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the name http.server dispatches to)
                server._handle(self)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # socketserver's 5 drops connections beyond it: 1 s SYN retries per batch
            daemon_threads = True  # a handler still sleeping for a timeout test must not block exit

        self._httpd = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers.get("Content-Length", 0))) or b"{}")
        with self._state:
            self.requests.append(body)
            self.headers.append(dict(handler.headers))
            failure = self.failures.popleft() if self.failures else self.status_for(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            delay = self.delay_s(body) if callable(self.delay_s) else self.delay_s
            time.sleep(delay)
            if handler.path not in ROUTES:
                status, reply = 404, {"error": {"message": f"no route {handler.path}"}}
            elif failure is not None:
                status, reply = failure, {"error": {"message": MESSAGES.get(failure, f"injected {failure}")}}
            else:
                status, reply = 200, self._complete(handler.path, body)
        finally:
            # Out of flight before the reply goes: once the client has it, it may send its next request, which
            # another server thread can count before this one would have stepped down (3 in flight under 2).
            with self._state:
                self._in_flight -= 1
        self._send(handler, status, reply)

    def _complete(self, path: str, body: dict) -> dict:
        chat = path.endswith("/chat/completions")
        if self.respond is not None:
            text, n_tokens, truncated = (t := self.respond(body)), len(t.split()), False
        else:
            params = SamplingParams(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                                    max_new_tokens=body.get("max_tokens", 16), seed=body.get("seed", 0),
                                    stop=tuple(body.get("stop") or ()), logprobs=bool(body.get("logprobs")))
            with self._generation:
                out = self.generator.generate([body["messages"] if chat else body["prompt"]], params)[0]
            text, n_tokens, truncated = out.text, out.n_tokens, out.truncated
        finish = "length" if truncated else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text, "finish_reason": finish})
        if body.get("logprobs") and self.respond is None:
            # The two APIs' shapes; the token strings are not what a client of srlm reads.
            values = list(out.token_logprobs or ())
            choice["logprobs"] = ({"content": [{"token": "", "logprob": v, "bytes": [], "top_logprobs": []}
                                               for v in values]} if chat
                                  else {"tokens": [""] * len(values), "token_logprobs": values, "top_logprobs": None,
                                        "text_offset": []})
        answer = {"id": f"cmpl-{len(self.requests)}", "object": "chat.completion" if chat else "text_completion",
                  "model": body.get("model", self.model), "choices": [choice]}
        if not self.omit_usage:
            answer["usage"] = {"prompt_tokens": 0, "completion_tokens": n_tokens, "total_tokens": n_tokens}
        return answer

    def _send(self, handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if not self.drip_s:
                handler.wfile.write(data)
            for i in range(len(data) if self.drip_s else 0):
                handler.wfile.write(data[i : i + 1])
                handler.wfile.flush()
                time.sleep(self.drip_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer
