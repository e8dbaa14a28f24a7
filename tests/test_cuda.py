"""Checks that need a CUDA GPU: `pytest -m cuda`, run by scripts/gpu_check.sh whenever a session has a GPU.

Skipped on machines without one (CI has none). The bundle is the tiny test bundle, or on a GPU machine without MiniLM
the one named by LORAMIX_CUDA_TEST_BUNDLE (gpu_check.sh writes a tiny random one with `gpu_bench.py bundle --tiny`).
fp32 on the GPU is held to the CPU's tokens; bf16 to the agreement stated in each test.
"""

from __future__ import annotations

import os

import pytest
import torch

from loramix.engine import Engine
from loramix.generation import GenerationOptions, MixtureModel

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [
    "Question: What is 2 + 3?\n\nAnswer:",
    "Write a function that adds two numbers.\n\nAnswer:",
    "Context:\nThe sky is blue.\n\nQuestion: What colour is the sky?\n\nAnswer:",
    "Question: Which gas do plants take in?\nChoices: A. oxygen\nB. carbon dioxide\n\nAnswer:",
]
ROUTES = ("hidden", "uniform", "top1", "prompt:top1")


@pytest.fixture(scope="module")
def bundle(request) -> str:
    named = os.environ.get("LORAMIX_CUDA_TEST_BUNDLE")
    return named if named else str(request.getfixturevalue("tiny_bundle"))


def load(bundle: str, device: str, dtype: str, merge: str = "exact") -> MixtureModel:
    return MixtureModel.from_bundle(bundle, merge=merge, device=device, dtype=dtype, embedder_dtype="fp32")


def test_auto_placement_is_the_gpu_in_bf16():
    from loramix.hardware import Placement

    device, dtype = Placement().resolve()
    assert device.type == "cuda"
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@pytest.mark.parametrize("merge", ["exact", "linear", "peft04"])
def test_fp32_on_the_gpu_gives_the_cpus_tokens_and_weights(bundle, merge):
    cpu, gpu = load(bundle, "cpu", "fp32", merge), load(bundle, "cuda", "fp32", merge)
    assert next(gpu.model.parameters()).device.type == "cuda"
    for route in ROUTES:
        options = GenerationOptions(route=route, max_new_tokens=12, min_new_tokens=12)
        expected, got = cpu.generate(PROMPTS, options), gpu.generate(PROMPTS, options)
        for a, b in zip(expected, got):
            assert a.token_ids == b.token_ids, (merge, route)
            assert torch.allclose(torch.as_tensor(a.weights), torch.as_tensor(b.weights), atol=1e-4), (merge, route)


def test_bf16_on_the_gpu_routes_as_fp32(bundle):
    """bf16 holds the routing of the first token (the prompt's weights) within 0.05 and its leading expert."""
    exact, half = load(bundle, "cuda", "fp32"), load(bundle, "cuda", "bf16")
    assert half.model.dtype == torch.bfloat16
    for route in ("hidden", "top1"):
        options = GenerationOptions(route=route, max_new_tokens=4, min_new_tokens=4)
        for a, b in zip(exact.generate(PROMPTS, options), half.generate(PROMPTS, options)):
            first_a, first_b = torch.as_tensor(a.weights[0]).float(), torch.as_tensor(b.weights[0]).float()
            assert first_a.argmax() == first_b.argmax(), route
            assert (first_a - first_b).abs().max() < 0.05, route


def test_the_engine_on_the_gpu_chunked_and_batched_equals_each_alone(bundle):
    gpu = load(bundle, "cuda", "fp32")
    engine = Engine(gpu, prefill_chunk=8)
    requests = [
        (p * 3, GenerationOptions(route=r, max_new_tokens=10, min_new_tokens=10)) for p, r in zip(PROMPTS, ROUTES)
    ]
    sequences = [gpu.new_sequence(p, o, i) for i, (p, o) in enumerate(requests)]
    engine.add(sequences[0])
    engine.step()
    for seq in sequences[1:]:
        engine.add(seq)
    while engine.busy:
        engine.step()
    for seq, (prompt, options) in zip(sequences, requests):
        assert seq.token_ids == gpu.generate(prompt, options).token_ids, options.route


def test_serve_on_the_gpu_answers_as_generate(bundle):
    import httpx

    from helpers import start_server, stop_server

    process, url = start_server("--bundle", bundle, "--device", "cuda", "--embedder-dtype", "fp32")
    try:
        body = {"model": "loramix", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    finally:
        stop_server(process)
    expected = load(bundle, "cuda", "fp32").generate(PROMPTS[0], max_new_tokens=10)
    assert answer["choices"][0]["text"] == expected.text
