"""Shared fixtures: a tiny random Llama with random LoRA experts, a tiny task data folder, MiniLM."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_random_expert, make_tiny_base  # noqa: E402

# pytest-xdist runs one worker per core: each takes one thread, so they do not fight over the cores
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
# Every run sees the same terminal, whoever starts it: 80 columns, the width of a plain non-tty shell or CI runner.
# (Command output must read right at that width; tables may fold, messages may not break mid-phrase.)
os.environ["COLUMNS"] = "80"


@pytest.fixture(autouse=True)
def _isolated_home(request, tmp_path_factory, monkeypatch):
    """Tests never touch the user's cache, except the real-model tests, which share the converted default model
    (a pure function of the installed package) so it is converted once per machine, not once per run."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("LORAMIX_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_experts(tiny_base, tmp_path_factory) -> list[Path]:
    """Three random rank-4 q/v experts, tagged with the tasks gsm8k, arc and codealpaca."""
    from loramix.models import base_model_signature, load_base_model

    model, _ = load_base_model(str(tiny_base))
    signature = base_model_signature(model)
    root = tmp_path_factory.mktemp("experts")
    return [
        make_random_expert(
            tiny_base,
            root / task,
            seed=seed,
            metadata={"task": task, "base_model": str(tiny_base), "base_model_signature": signature},
        )
        for seed, task in enumerate(["gsm8k", "arc", "codealpaca"])
    ]


@pytest.fixture(scope="session")
def embedder():
    from loramix.router import Embedder

    # fp32: exactness tests compare embeddings of texts batched differently; under bf16 autocast (the "auto"
    # choice on CPUs with AMX / AVX512-BF16) those differ by ~1e-4.
    return Embedder(dtype="fp32")


def write_tiny_data(root: Path) -> Path:
    """A few items per task in the layout of ../shared/data."""
    (root / "gsm8k").mkdir(parents=True)
    gsm = [
        {
            "question": f"Tom has {i} apples and buys {i + 1} more. How many?",
            "answer": f"{i}+{i + 1}={2 * i + 1}\n#### {2 * i + 1}",
        }
        for i in range(12)
    ]
    for split in ("train", "test"):
        (root / "gsm8k" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in gsm))
    (root / "arc_challenge").mkdir()
    arc = [
        {
            "id": f"q{i}",
            "question": {
                "stem": f"Which is a planet {i}?",
                "choices": [{"label": "1", "text": "Mars"}, {"label": "2", "text": "Moon"}],
            },
            "answerKey": "1",
        }
        for i in range(12)
    ]
    for name in ("Train", "Dev", "Test"):
        (root / "arc_challenge" / f"ARC-Challenge-{name}.jsonl").write_text("\n".join(json.dumps(r) for r in arc))
    (root / "squad_v1.1").mkdir()
    articles = [
        {
            "title": f"T{a}",
            "paragraphs": [
                {
                    "context": f"Article {a} says the sky is blue.",
                    "qas": [
                        {"id": f"s{a}", "question": "What colour?", "answers": [{"text": "blue", "answer_start": 0}]}
                    ],
                }
            ],
        }
        for a in range(8)
    ]
    (root / "squad_v1.1" / "dev-v1.1.json").write_text(json.dumps({"data": articles, "version": "1.1"}))
    (root / "codealpaca").mkdir()
    code = [
        {"instruction": f"Write code number {i}.", "input": "x = 1" if i % 2 else "", "output": f"print({i})"}
        for i in range(20)
    ]
    (root / "codealpaca" / "code_alpaca_2k.json").write_text(json.dumps(code))
    (root / "bbh").mkdir()
    booleans = [{"input": f"not ( {b} ) is", "target": str(not b)} for b in [True, False] * 5]
    (root / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": booleans}))
    sums = [{"input": f"({i} + {i}) =", "target": str(2 * i)} for i in range(10)]
    (root / "bbh" / "multistep_arithmetic_two.json").write_text(json.dumps({"examples": sums}))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_base, tiny_experts, tiny_data, tmp_path_factory) -> Path:
    from loramix.bundle_build import build_bundle

    root = tmp_path_factory.mktemp("bundle")
    build_bundle(root, {p.name: p for p in tiny_experts}, base_model=str(tiny_base), data=tiny_data)
    return root


@pytest.fixture(scope="session")
def tiny_mixture(tiny_bundle):
    from loramix.generation import MixtureModel

    return MixtureModel.from_bundle(tiny_bundle, embedder_dtype="fp32")  # exact routing, as the reference


TINY_SERVER_BUDGET = 3000  # KV-cache tokens of the shared tiny server: a few long requests at a time


@pytest.fixture(scope="session")
def tiny_server(tiny_bundle):
    """One `loramix serve` of the tiny bundle for every test that only talks to it (a server costs seconds to start):
    fp32 routing as the in-process tiny mixture it is compared with, small prefill chunks (so every longer prompt
    is taken in several), a KV budget a few long requests fill."""
    from helpers import start_server, stop_server

    process, url = start_server(
        "--bundle", str(tiny_bundle), "--embedder-dtype", "fp32", "--max-new-tokens-limit", "64", "--max-batch", "8",
        "--max-queue", "256", "--max-batch-tokens", str(TINY_SERVER_BUDGET), "--prefill-chunk", "32",
    )  # fmt: skip
    yield url
    stop_server(process)
