"""The server app in-process (FastAPI's TestClient): loading, keys, a full queue, a failing engine step."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from loramix.errors import LoramixError
from loramix.server import ServeSettings, create_app

BODY = {"model": "loramix", "prompt": "Question: What is 2 + 3?\n\nAnswer:", "max_tokens": 4, "temperature": 0}


def wait_healthy(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.05)


def test_health_is_503_while_the_model_loads_and_requests_are_told_to_retry(tiny_mixture):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return tiny_mixture

    with TestClient(create_app(ServeSettings(), load=slow_load)) as client:
        assert client.get("/health").status_code == 503
        assert client.get("/health").json()["status"] == "loading"
        refused = client.post("/v1/completions", json=BODY)
        assert refused.status_code == 503 and "loading" in refused.json()["error"]["message"]
        loaded.set()
        wait_healthy(client)
        assert client.post("/v1/completions", json=BODY).status_code == 200


def test_a_model_that_fails_to_load_is_reported_not_hidden():
    def broken():
        raise LoramixError("Router file x is missing; build it with `loramix router build`.")

    with TestClient(create_app(ServeSettings(), load=broken)) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "router build" in client.post("/v1/completions", json=BODY).json()["error"]["message"]


def test_a_default_route_the_bundle_cannot_follow_is_reported_by_health(tiny_mixture):
    with TestClient(create_app(ServeSettings(route="oracle:poetry"), load=lambda: tiny_mixture)) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "no expert named 'poetry'" in client.get("/health").json()["error"]


def test_an_api_key_is_required_when_set(tiny_mixture):
    with TestClient(create_app(ServeSettings(api_key="s3cret"), load=lambda: tiny_mixture)) as client:
        wait_healthy(client)
        missing = client.post("/v1/completions", json=BODY)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert client.get("/v1/models").status_code == 401
        right = client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert client.get("/health").status_code == 200  # health and metrics stay open for probes
        assert client.get("/metrics").status_code == 200


def _slow_steps(monkeypatch, seconds: float = 0.03) -> None:
    """Each decode step takes a little while, so requests overlap as they would on a real model."""
    from loramix.runner import ModelRunner

    real = ModelRunner.decode

    def slow(self, lane):
        time.sleep(seconds)
        return real(self, lane)

    monkeypatch.setattr(ModelRunner, "decode", slow)


def test_a_full_queue_answers_429_and_the_queued_requests_still_finish(tiny_mixture, monkeypatch):
    _slow_steps(monkeypatch)
    long = {**BODY, "max_tokens": 40, "min_tokens": 40}
    with TestClient(create_app(ServeSettings(max_batch=1, max_queue=2), load=lambda: tiny_mixture)) as client:
        wait_healthy(client)
        statuses = {}
        threads = [
            threading.Thread(target=lambda i=i: statuses.__setitem__(i, client.post("/v1/completions", json=long)))
            for i in range(3)
        ]  # one runs, two wait: the queue is full
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        assert client.get("/health").json()["waiting"] == 2
        refused = client.post("/v1/completions", json=BODY)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.headers["retry-after"]
        for thread in threads:
            thread.join(timeout=60)
        assert [statuses[i].status_code for i in range(3)] == [200, 200, 200]
        assert client.post("/v1/completions", json={**BODY, "n": 2}).status_code == 200


def test_a_request_whose_sampling_fails_ends_alone_and_the_others_go_on(tiny_mixture, monkeypatch):
    import loramix.engine as engine_module

    _slow_steps(monkeypatch)
    real = engine_module.choose_token

    def choose(logits, temperature, *args):
        if temperature == 0.5:  # only the doomed request samples at 0.5
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "choose_token", choose)
    other = {**BODY, "max_tokens": 30, "min_tokens": 30}
    with TestClient(create_app(ServeSettings(), load=lambda: tiny_mixture)) as client:
        wait_healthy(client)
        answers = {}
        thread = threading.Thread(target=lambda: answers.update(ok=client.post("/v1/completions", json=other)))
        thread.start()
        time.sleep(0.3)
        doomed = client.post("/v1/completions", json={**BODY, "temperature": 0.5})
        thread.join(timeout=60)
        assert doomed.status_code == 500 and "probability tensor" in doomed.json()["error"]["message"]
        assert "other requests were not affected" in doomed.json()["error"]["message"]
        expected = tiny_mixture.generate(BODY["prompt"], max_new_tokens=30, min_new_tokens=30).text
        assert answers["ok"].status_code == 200 and answers["ok"].json()["choices"][0]["text"] == expected
        assert client.get("/health").json()["status"] == "ok"


def test_a_failure_no_request_owns_ends_the_running_requests_with_500_and_the_server_goes_on(tiny_mixture, monkeypatch):
    from loramix.engine import Engine

    real_step = Engine.step
    failures = {"left": 1}

    def flaky_step(self):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("simulated out-of-memory")
        return real_step(self)

    monkeypatch.setattr(Engine, "step", flaky_step)
    with TestClient(create_app(ServeSettings(), load=lambda: tiny_mixture)) as client:
        wait_healthy(client)
        failed = client.post("/v1/completions", json=BODY)
        assert failed.status_code == 500 and "simulated out-of-memory" in failed.json()["error"]["message"]
        assert client.post("/v1/completions", json=BODY).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "settings,match",
    [(dict(max_batch=0), "max-batch"), (dict(port=70000), "port"), (dict(every_k=0), "every-k"),
     (dict(merge="sum"), "merge"), (dict(prefill_chunk=0), "prefill-chunk"),
     (dict(max_batch_tokens=0), "max-batch-tokens"), (dict(shutdown_timeout=-1), "shutdown-timeout")],
)  # fmt: skip
def test_bad_server_settings_are_refused_at_start(settings, match):
    with pytest.raises(LoramixError, match=match):
        create_app(ServeSettings(**settings), load=lambda: None)
