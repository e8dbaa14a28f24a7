"""Serving under hostile and busy traffic: an API fuzzer from the server's own schema, numerics no request can break,
the KV budget, chunked prefill beside running streams, and a graceful drain on SIGTERM. Loopback only, bounded."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import TINY_SERVER_BUDGET
from helpers import start_server, stop_server, streamed

PROMPT = "Question: What is 2 + 3?\n\nAnswer:"
LONG = "Context:\nThe sky is blue and the grass is green. " * 12 + "\n\nQuestion: What colour is the sky?\n\nAnswer:"
BUDGET = TINY_SERVER_BUDGET


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server  # prefill chunks of 32 tokens, a KV budget of BUDGET tokens


def test_a_fuzzer_from_the_servers_own_schema_finds_no_server_error(server):
    """schemathesis generates requests from /openapi.json (both POST endpoints have typed bodies) and checks that
    none is answered with a 5xx."""
    schema = httpx.get(server + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].rsplit("/", 1)[1] in schema["components"]["schemas"]
    assert schema["components"]["schemas"]["CompletionRequest"]["properties"]["route"]
    cli = shutil.which("schemathesis", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert cli, "schemathesis is a dev dependency (make test installs it)"
    run = subprocess.run(
        [cli, "run", server + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "60",
         "--phases", "examples,coverage,fuzzing", "--no-color", "--seed", "1", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-4000:]
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) >= 200, report[-2000:]  # a bounded but real number of requests
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_a_tiny_temperature_beside_a_stream_ends_neither(server, tiny_mixture):
    body = {"model": "loramix", "prompt": PROMPT, "max_tokens": 40, "min_tokens": 40, "temperature": 0}
    result = {}
    thread = threading.Thread(target=lambda: result.update(streamed(server, body)))
    thread.start()
    for temperature in (1e-40, 5e-324, 1e-6):
        tiny = httpx.post(server + "/v1/completions", json={**body, "temperature": temperature}, timeout=60)
        assert tiny.status_code == 200, tiny.text
    thread.join(timeout=120)
    assert result["error"] is None and result["done"]
    assert result["text"] == tiny_mixture.generate(PROMPT, max_new_tokens=40, min_new_tokens=40).text


def test_a_long_prompt_in_chunks_beside_a_stream_gives_both_their_tokens_alone(server, tiny_mixture):
    body = {"model": "loramix", "prompt": PROMPT, "max_tokens": 48, "min_tokens": 48, "temperature": 0}
    result = {}
    thread = threading.Thread(target=lambda: result.update(streamed(server, body)))
    thread.start()
    long_body = {**body, "prompt": LONG, "max_tokens": 6, "min_tokens": 6}
    long = httpx.post(server + "/v1/completions", json=long_body, timeout=60)
    thread.join(timeout=120)
    assert long.status_code == 200 and long.json()["usage"]["prompt_tokens"] > 32 * 4  # several chunks
    assert long.json()["choices"][0]["text"] == tiny_mixture.generate(LONG, max_new_tokens=6, min_new_tokens=6).text
    assert result["text"] == tiny_mixture.generate(PROMPT, max_new_tokens=48, min_new_tokens=48).text


def test_a_request_over_the_kv_budget_is_refused_naming_the_limit(server):
    over = {"model": "loramix", "prompt": LONG, "max_tokens": 64, "n": 16}  # 16 x (prompt + 64) > BUDGET
    response = httpx.post(server + "/v1/completions", json=over, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "max_tokens"
    assert "--max-batch-tokens" in error["message"] and str(BUDGET) in error["message"]
    fits = httpx.post(server + "/v1/completions", json={**over, "n": 1, "max_tokens": 4}, timeout=60)
    assert fits.status_code == 200


def test_usage_counts_every_prompt_once(server, tiny_mixture):
    prompts = [PROMPT, PROMPT + " Five."]
    response = httpx.post(server + "/v1/completions", json={"model": "loramix", "prompt": prompts, "max_tokens": 2,
                                                             "n": 2, "temperature": 0}, timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    lengths = [len(tiny_mixture.tokenizer(p).input_ids) for p in prompts]
    assert response.json()["usage"]["prompt_tokens"] == sum(lengths)
    assert len(response.json()["choices"]) == 4


def test_many_requests_beyond_the_budget_wait_their_turn_and_all_finish(server):
    body = {"model": "loramix", "prompt": LONG, "max_tokens": 8, "min_tokens": 8, "temperature": 0}
    statuses = []

    def one():
        statuses.append(httpx.post(server + "/v1/completions", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=one) for _ in range(16)]  # 16 x LONG: over the budget together
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses == [200] * 16


@pytest.fixture
def own_server(tiny_bundle):
    started = []

    def start(*extra: str):
        process, url = start_server("--bundle", str(tiny_bundle), "--embedder-dtype", "fp32", *extra)
        started.append(process)
        return process, url

    yield start
    for process in started:
        if process.poll() is None:
            stop_server(process)


def test_sigterm_drains_the_running_stream_refuses_newcomers_and_exits_0(own_server):
    process, url = own_server("--max-new-tokens-limit", "512")
    body = {"model": "loramix", "prompt": PROMPT, "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    refused = {}

    def on_chunk(count: int) -> None:
        if count == 3:  # mid-stream: stop the server, then knock while it drains
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused["response"] = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 4, "min_tokens": 0})

    result = streamed(url, body, on_chunk)
    assert result["done"] and result["error"] is None and result["chunks"] == 200  # the stream completed
    response = refused["response"]
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "shutting down" in response.json()["error"]["message"]
    assert process.wait(timeout=60) == 0


def test_a_stream_past_the_shutdown_timeout_ends_with_an_error_event(own_server):
    process, url = own_server("--max-new-tokens-limit", "512", "--shutdown-timeout", "0")
    body = {"model": "loramix", "prompt": PROMPT, "max_tokens": 500, "min_tokens": 500, "temperature": 0}

    def on_chunk(count: int) -> None:
        if count == 3:
            process.send_signal(signal.SIGTERM)

    result = streamed(url, body, on_chunk)
    assert result["error"] is not None and "shut down" in result["error"]["message"]
    assert 0 < result["chunks"] < 500 and not result["done"]
    assert process.wait(timeout=60) == 0
