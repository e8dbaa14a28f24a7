"""The whole flow on a second architecture: a tiny random GPT-NeoX, whose attention layers are named
query_key_value / dense (not Llama's q_proj / v_proj): train, build both routers, generate (batched equals alone,
exact against PEFT), evaluate, serve."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from helpers import make_tiny_base
from loramix.bundle_build import build_bundle
from loramix.errors import LoramixError
from loramix.evaluation import EvalPlan, run_evaluation
from loramix.generation import MixtureModel
from loramix.models import load_base_model
from loramix.server import ServeSettings, create_app
from loramix.training import TrainConfig, train_expert

TARGETS = ("query_key_value", "dense")
PROMPTS = ["Question: What is 2 + 3?\n\nAnswer:", "Write a function that adds two numbers.\n\nAnswer:"]


@pytest.fixture(scope="module")
def neox_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("neox") / "base", architecture="gpt_neox")


def _config(task: str, base, **changes) -> TrainConfig:
    settings = dict(task=task, base_model=str(base), rank=4, target_modules=TARGETS, max_examples=8, max_steps=2,
                    batch_size=4, bf16=False, save_steps=100)  # fmt: skip
    return TrainConfig(**(settings | changes))


@pytest.fixture(scope="module")
def neox_bundle(neox_base, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("neox-bundle")
    experts = {}
    for task in ("gsm8k", "codealpaca"):
        train_expert(_config(task, neox_base), root / "trained" / task, data=tiny_data, quiet=True)
        experts[task] = root / "trained" / task
    build_bundle(root / "bundle", experts, base_model=str(neox_base), data=tiny_data)
    return root / "bundle"


@pytest.fixture(scope="module")
def neox_mixture(neox_bundle):
    return MixtureModel.from_bundle(neox_bundle, embedder_dtype="fp32")


def test_llama_target_names_are_refused_with_this_models_own(neox_base, tiny_data, tmp_path):
    with pytest.raises(LoramixError, match="no Linear layers named q_proj, v_proj.*query_key_value"):
        train_expert(_config("gsm8k", neox_base, target_modules=("q_proj", "v_proj")), tmp_path / "x", data=tiny_data)


def test_experts_adapt_the_models_own_layers_and_equal_peft(neox_base, neox_bundle, neox_mixture):
    from loramix.mixture import MixtureLinear

    adapted = {n.rsplit(".", 1)[-1] for n, m in neox_mixture.model.named_modules() if isinstance(m, MixtureLinear)}
    assert adapted == set(TARGETS)
    model, tokenizer = load_base_model(str(neox_base))
    peft_model = PeftModel.from_pretrained(model, str(neox_bundle / "experts" / "codealpaca"))
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    ours, _, _ = neox_mixture.forward(
        batch.input_ids, batch.attention_mask, None, None, torch.tensor([[0.0, 1.0]]), "exact"
    )
    assert (ours - theirs[:, -1]).abs().max() < 1e-4


@pytest.mark.parametrize("route", ["hidden", "paper", "top1", "prompt"])
def test_batched_generation_equals_one_at_a_time(neox_mixture, route):
    batch = neox_mixture.generate(PROMPTS, route=route, max_new_tokens=8, min_new_tokens=8)
    for prompt, batched in zip(PROMPTS, batch):
        alone = neox_mixture.generate(prompt, route=route, max_new_tokens=8, min_new_tokens=8)
        assert batched.token_ids == alone.token_ids
        assert torch.allclose(batched.weights, alone.weights, atol=1e-5)


def test_evaluation_and_serving_run_on_it(neox_bundle, neox_mixture, tiny_data, tmp_path):
    plan = EvalPlan(bundle=neox_bundle, tasks=("gsm8k", "codealpaca"), configs="base,oracle,tla:k=1,route=hidden",
                    out=tmp_path / "eval", limit=2, batch_size=2, data=tiny_data, max_new_tokens=6,
                    embedder_dtype="fp32")  # fmt: skip
    store = run_evaluation(plan, progress=False)
    cells = {(r["config"], r["task"]) for r in store.records.values()}
    assert len(cells) == 6 and len(store.records) == 12
    body = {"model": "loramix", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "return_routing": True}
    with TestClient(create_app(ServeSettings(), load=lambda: neox_mixture)) as client:
        while client.get("/health").status_code != 200:
            pass
        answer = client.post("/v1/completions", json=body).json()
    alone = neox_mixture.generate(PROMPTS[0], max_new_tokens=5)
    assert answer["choices"][0]["text"] == alone.text
