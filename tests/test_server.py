"""`loramix serve`: the OpenAI API with the official client, streaming, routing fields, bad input, cancellation,
and a bounded load test. The server runs the tiny random model on a free loopback port."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from loramix.openai_serving import StopHoldback

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (make test installs it)")

LIMIT = 64
PROMPTS = [
    "Question: What is 2 + 3?\n\nAnswer:",
    "Write a function that adds two numbers.\n\nAnswer:",
    "Context:\nThe sky is blue.\n\nQuestion: What colour is the sky?\n\nAnswer:",
    "Question: Which gas do plants take in?\nChoices: A. oxygen\nB. carbon dioxide\n\nAnswer:",
]


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server  # max_tokens up to LIMIT


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def alone(mixture, prompt, **options):
    return mixture.generate(prompt, **options)


def assert_routing_rows_sum_to_one(rows):
    assert rows, "routing was asked for"
    for weights in rows:
        assert sum(weights) == pytest.approx(1.0, abs=1e-4)


def test_completion_equals_generate_alone_and_carries_the_trace(client, tiny_mixture):
    response = client.completions.create(
        model="loramix", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"return_routing": True}
    )
    expected = alone(tiny_mixture, PROMPTS[0], max_new_tokens=12)
    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    trace = choice.model_extra["routing"]
    assert trace["experts"] == tiny_mixture.expert_names
    assert len(trace["weights"]) == len(expected.token_ids) == response.usage.completion_tokens
    assert_routing_rows_sum_to_one(trace["weights"])
    assert trace["reroutes"] == expected.reroutes
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_completion_equals_generate_alone_token_by_token(client, tiny_mixture):
    options = dict(every_k=1, route="softmax", merge="linear", min_tokens=10)
    stream = client.completions.create(
        model="loramix", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        extra_body={"return_routing": True, **options},
    )  # fmt: skip
    chunks = list(stream)
    expected = alone(
        tiny_mixture, PROMPTS[1], max_new_tokens=10, min_new_tokens=10, every_k=1, route="softmax", merge="linear"
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    routing = [r for c in chunks for r in c.choices[0].model_extra["routing"]]
    assert len(routing) == 10
    assert_routing_rows_sum_to_one([list(r["weights"].values()) for r in routing])
    assert [i for i, r in enumerate(routing) if r["rerouted"]] == expected.reroutes == list(range(10))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_uses_the_chat_template_streamed_or_not(client, tiny_mixture):
    messages = [{"role": "user", "content": "What colour is the sky?"}]
    rendered = tiny_mixture.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = alone(tiny_mixture, rendered, max_new_tokens=8)
    whole = client.chat.completions.create(model="loramix", messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="loramix", messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_routing": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_model_names_choose_the_route(client, tiny_mixture):
    names = [m.id for m in client.models.list().data]
    assert names == ["loramix", "loramix:base"] + [f"loramix:{e}" for e in tiny_mixture.expert_names]
    for model, route in (("loramix:base", "base"), ("loramix:arc", "oracle:arc")):
        response = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=6, temperature=0)
        assert response.choices[0].text == alone(tiny_mixture, PROMPTS[2], max_new_tokens=6, route=route).text


def test_sampling_with_a_seed_is_reproducible_and_n_gives_distinct_choices(client):
    def sample():
        return client.completions.create(
            model="loramix",
            prompt=PROMPTS[3],
            max_tokens=12,
            temperature=1.0,
            seed=7,
            n=2,
            extra_body={"min_tokens": 12},
        )

    first, second = sample(), sample()
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # seeds 7 and 8
    assert first.usage.completion_tokens == 24


def test_logprobs_of_the_chosen_tokens(client):
    response = client.completions.create(model="loramix", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert chosen <= 0 and max(top.values()) == pytest.approx(chosen)


def test_a_stop_string_never_reaches_the_stream():
    holdback = StopHoldback(("\n\n",))
    sent = [holdback.feed(piece, False) for piece in ["Hello", " world", "\n"]]
    assert sent == ["Hello", " world", ""]  # the newline could start the stop string: held back
    assert holdback.feed("\nmore", True) == ""
    assert holdback.sent == "Hello world"
    other = StopHoldback(("STOP",))
    assert [other.feed(p, False) for p in ["ab", "S", "x"]] == ["ab", "", "Sx"]


def test_stop_strings_cut_the_streamed_text_as_the_whole_one(client, tiny_mixture):
    expected = alone(tiny_mixture, PROMPTS[0], max_new_tokens=40)
    stop = expected.text[len(expected.text) // 3 : len(expected.text) // 3 + 2]
    assert stop.strip(), "a printable stop string taken from the answer itself"
    whole = client.completions.create(model="loramix", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop])
    streamed = client.completions.create(
        model="loramix", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop], stream=True
    )
    text = "".join(c.choices[0].text for c in streamed)
    assert whole.choices[0].text == text == expected.text[: expected.text.find(stop)]
    assert whole.choices[0].finish_reason == "stop"


def _post(url: str, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


GOOD = {"model": "loramix", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
BAD_INPUTS = [
    ("unknown model", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("unknown expert in model", {**GOOD, "model": "loramix:poetry"}, 404, "model"),
    ("unknown expert in route", {**GOOD, "route": "oracle:poetry"}, 400, "route"),
    ("unknown route", {**GOOD, "route": "telepathy"}, 400, "route"),
    ("every_k zero", {**GOOD, "every_k": 0}, 400, "every_k"),
    ("every_k negative", {**GOOD, "every_k": -2}, 400, "every_k"),
    ("negative max_tokens", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens"),
    ("empty prompt", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("blank prompt", {**GOOD, "prompt": "   "}, 400, "prompt"),
    ("empty prompt list", {**GOOD, "prompt": []}, 400, "prompt"),
    ("prompt over the context", {**GOOD, "prompt": "word " * 3000, "max_tokens": 8}, 400, "max_tokens"),
    ("token ids outside the vocabulary", {**GOOD, "prompt": [1, 2, 10**7]}, 400, "prompt"),
    ("non-UTF-8 body", b'{"model": "loramix", "prompt": "\xff\xfe"}', 400, None),
    ("malformed JSON", b'{"model": "loramix", "prompt": ', 400, None),
    ("JSON that is not an object", b"[1, 2, 3]", 400, None),
    ("wrong type: max_tokens as text", {**GOOD, "max_tokens": "5"}, 400, "max_tokens"),
    ("wrong type: prompt as a number", {**GOOD, "prompt": 42}, 400, "prompt"),
    ("wrong type: stream as text", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("missing model", {"prompt": "hi"}, 400, "model"),
    ("NaN temperature", b'{"model": "loramix", "prompt": "Hi", "temperature": NaN}', 400, "temperature"),
    ("negative temperature", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("top_p zero", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("fixed weights of the wrong length", {**GOOD, "route": "fixed:1,2"}, 400, "route"),
    ("negative fixed weights", {**GOOD, "route": "fixed:1,-1,1"}, 400, "route"),
    ("unknown merge mode", {**GOOD, "merge": "sum"}, 400, "merge"),
    ("unknown decode mode", {**GOOD, "decode": "psychic"}, 400, "decode"),
    ("route on a model that fixes it", {**GOOD, "model": "loramix:base", "route": "uniform"}, 400, "route"),
    ("n zero", {**GOOD, "n": 0}, 400, "n"),
    ("too many stop strings", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("logprobs too many", {**GOOD, "logprobs": 50}, 400, "logprobs"),
]


@pytest.mark.parametrize("what,body,status,param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_in_openais_shape(server, what, body, status, param):
    response = _post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if what == "prompt over the context":
        assert error["code"] == "context_length_exceeded"


def test_bad_chat_input(server):
    assert _post(server, "/v1/chat/completions", {"model": "loramix", "messages": []}).status_code == 400
    bad_role = {"model": "loramix", "messages": [{"role": "wizard", "content": "hi"}]}
    assert _post(server, "/v1/chat/completions", bad_role).json()["error"]["param"].startswith("messages")
    empty = {"model": "loramix", "messages": [{"role": "user", "content": "  "}]}
    assert _post(server, "/v1/chat/completions", empty).status_code == 400


def test_bad_input_does_not_disturb_a_request_in_flight(server, tiny_mixture):
    """A long streamed request runs while every bad input is thrown at the server; it ends as it would alone."""
    result = {}

    def long_request():
        body = {**GOOD, "prompt": PROMPTS[2], "max_tokens": 48, "min_tokens": 48, "stream": True}
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        result["text"] = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)

    thread = threading.Thread(target=long_request)
    thread.start()
    for _, body, status, _ in BAD_INPUTS:
        assert _post(server, "/v1/completions", body).status_code == status
    thread.join(timeout=120)
    assert result["text"] == alone(tiny_mixture, PROMPTS[2], max_new_tokens=48, min_new_tokens=48).text
    assert httpx.get(server + "/health").json()["status"] == "ok"


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_client_that_disconnects_cancels_its_sequence(server):
    before = _metric(server, "loramix_cancelled_sequences_total")
    body = {**GOOD, "max_tokens": LIMIT, "min_tokens": LIMIT, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 4:
                break  # leave mid-answer
    deadline = time.monotonic() + 30
    while _metric(server, "loramix_cancelled_sequences_total") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "loramix_cancelled_sequences_total") == before + 1
    while _metric(server, "loramix_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "loramix_running_sequences") == 0


def test_metrics_and_the_page(server):
    text = httpx.get(server + "/metrics").text
    for name in (
        "loramix_requests_total", "loramix_generated_tokens_total", "loramix_queue_depth",
        "loramix_time_to_first_token_seconds_bucket", "loramix_inter_token_latency_seconds_bucket",
        "loramix_routing_seconds_total", "loramix_reroutes_total",
    ):  # fmt: skip
        assert name in text
    assert _metric(server, "loramix_generated_tokens_total") > 0
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/completions" in page.text


def test_load_32_concurrent_streaming_clients_lose_and_mix_up_nothing(server, tiny_mixture):
    """Bounded: 2 rounds of 32 concurrent streams of varied settings, each with a time limit; every greedy output
    equals the same request generated alone."""
    from loramix.loadtest import run_level

    variants = [
        {"every_k": 1}, {"every_k": 3, "route": "softmax"}, {"route": "prompt:top1", "merge": "linear"},
        {"decode": "recompute", "every_k": 2}, {"route": "uniform", "merge": "paper"}, {"model": "loramix:base"},
    ]  # fmt: skip
    bodies = []
    for i in range(32):
        variant = dict(variants[i % len(variants)])
        n = 8 + (i % 5) * 4
        bodies.append(
            {"model": variant.pop("model", "loramix"), "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": n,
             "min_tokens": n, "temperature": 0, "stream": True, **variant}
        )  # fmt: skip
    import asyncio

    expected = []
    for body in bodies:
        settings = {k: body[k] for k in ("every_k", "route", "merge", "decode") if k in body}
        if body["model"] == "loramix:base":
            settings["route"] = "base"
        expected.append(alone(tiny_mixture, body["prompt"], max_new_tokens=body["max_tokens"],
                              min_new_tokens=body["max_tokens"], **settings).text)  # fmt: skip
    for _ in range(2):
        results, seconds = asyncio.run(run_level(server, bodies, clients=32, timeout=120))
        assert [r.error for r in results] == [None] * 32
        assert [r.tokens for r in results] == [b["max_tokens"] for b in bodies]
        assert [r.text for r in results] == expected
