"""`loramix serve --ray`: 2 replicas of the tiny model on a local Ray instance (loopback only), the official
openai client, both replicas serving, every greedy output equal to generate alone, and nothing left behind.

Under CI=true this must run (make test installs the `ray` extra); elsewhere it skips when Ray is missing."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import start_server, stop_server, streamed
from loramix.errors import LoramixError
from loramix.ray_serve import RaySettings

PROMPTS = [
    "Question: What is 2 + 3?\n\nAnswer:",
    "Write a function that adds two numbers.\n\nAnswer:",
    "Context:\nThe sky is blue.\n\nQuestion: What colour is the sky?\n\nAnswer:",
    "Question: Which gas do plants take in?\nChoices: A. oxygen\nB. carbon dioxide\n\nAnswer:",
]


def _need_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the Ray test: install the ray extra (make test does)")
        pytest.skip("Ray Serve is not installed (pip install 'loramix[ray]')")


def ray_processes() -> set[int]:
    """Ids of the processes a Ray instance runs (GCS, raylet, workers, Serve's actors)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in command for mark in ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard")):
            found.add(int(entry.name))
    return found


def test_two_replicas_serve_the_same_answers_and_shutdown_leaves_no_ray_process(tiny_bundle, tiny_mixture):
    _need_ray()
    openai = pytest.importorskip("openai")
    before = ray_processes()
    process, url = start_server(
        "--ray",
        "--replicas",
        "2",
        "--num-cpus",
        "0.5",
        "--bundle",
        str(tiny_bundle),
        "--embedder-dtype",
        "fp32",
        timeout=300,
    )
    try:
        assert ray_processes() - before, "a local Ray instance is running"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(i: int):
            raw = client.completions.with_raw_response.create(
                model="loramix", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=16, temperature=0,
                extra_body={"min_tokens": 16, "every_k": 1 + i % 3},
            )  # fmt: skip
            return raw.headers["x-loramix-replica"], raw.parse().choices[0].text

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(ask, range(32)))
            for _ in range(3):  # Ray's proxy may learn of the second replica a moment after the first answers
                if len({replica for replica, _ in answers}) == 2:
                    break
                time.sleep(2)
                answers += list(pool.map(ask, range(32)))
        for i, (_, text) in enumerate(answers):
            expected = tiny_mixture.generate(
                PROMPTS[i % 32 % len(PROMPTS)], max_new_tokens=16, min_new_tokens=16, every_k=1 + i % 32 % 3
            )
            assert text == expected.text, i
        replicas = {replica for replica, _ in answers}
        assert len(replicas) == 2, f"both replicas served requests: {replicas}"
        # SIGTERM mid-stream: Ray Serve's graceful shutdown lets the running stream finish
        body = {"model": "loramix", "prompt": PROMPTS[0], "max_tokens": 120, "min_tokens": 120, "temperature": 0}
        signalled = threading.Event()

        def on_chunk(count: int) -> None:
            if count == 5 and not signalled.is_set():
                signalled.set()
                process.send_signal(signal.SIGTERM)

        drained = streamed(url, body, on_chunk)
        assert signalled.is_set() and drained["done"] and drained["error"] is None and drained["chunks"] == 120
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            stop_server(process)
    assert process.returncode == 0, process.stdout.read()
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "SIGTERM shut down the Ray instance the server started"


def test_a_replica_that_sees_another_bundle_refuses_to_start(tiny_bundle):
    _need_ray()
    from loramix.ray_serve import build_replica_app
    from loramix.server import ServeSettings

    with pytest.raises(LoramixError, match="another bundle"):
        build_replica_app(ServeSettings(bundle=str(tiny_bundle)), expected_digest="not-this-one")


@pytest.mark.parametrize(
    "settings,match",
    [(dict(replicas=0), "--replicas"), (dict(autoscale="3"), "MIN:MAX"), (dict(autoscale="4:2"), "MIN:MAX"),
     (dict(autoscale="a:b"), "MIN:MAX"), (dict(num_cpus=-1), "negative")],
)  # fmt: skip
def test_bad_ray_settings_are_refused(settings, match):
    with pytest.raises(LoramixError, match=match):
        RaySettings(**settings).check()


def test_autoscale_bounds_and_the_deployments_options():
    from loramix.ray_serve import deployment_options
    from loramix.server import ServeSettings

    assert RaySettings(autoscale="1:4").autoscale_bounds() == (1, 4)
    assert RaySettings().autoscale_bounds() is None
    settings = ServeSettings(max_batch=8, max_queue=32)
    fixed = deployment_options(settings, RaySettings(replicas=3, num_cpus=2, num_gpus=1))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1} and fixed["max_ongoing_requests"] == 40
    scaled = deployment_options(settings, RaySettings(autoscale="0:4"))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "initial_replicas": 1,
        "target_ongoing_requests": 8,
    }
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**scaled["autoscaling_config"])  # Ray accepts every key
