"""The router on the base model's own hidden states: centroids, centered cosine, routing from the forward passes
already being run, and its sequences batched with others exactly as alone."""

from __future__ import annotations

import shutil

import pytest
import torch

from loramix.engine import Engine
from loramix.errors import LoramixError
from loramix.generation import GenerationOptions, MixtureModel
from loramix.hidden_router import HIDDEN_ROUTER_FILE, HiddenRouter, masked_mean
from loramix.router import softmax_weights

PROMPT = "Question: What is 2 + 3?\n\nAnswer:"


@pytest.fixture(scope="module")
def hidden_bundle(tiny_bundle, tiny_data, tmp_path_factory):
    from loramix.bundle_build import build_hidden_router

    root = tmp_path_factory.mktemp("hidden") / "bundle"
    shutil.copytree(tiny_bundle, root)
    build_hidden_router(root, max_examples=6, data=tiny_data, batch_size=4)
    return root


@pytest.fixture(scope="module")
def hidden_mixture(hidden_bundle):
    return MixtureModel.from_bundle(hidden_bundle, embedder_dtype="fp32")


def test_centroids_cover_every_layer_and_expert(hidden_bundle, hidden_mixture):
    centroids = hidden_mixture.hidden_router.centroids
    layers = hidden_mixture.model.config.num_hidden_layers
    assert centroids.shape == (layers + 1, 3, hidden_mixture.model.config.hidden_size)
    assert (hidden_bundle / HIDDEN_ROUTER_FILE).is_file()


def test_centered_cosine_removes_the_shared_direction():
    common = torch.tensor([100.0, 0.0, 0.0])
    centroids = torch.stack([common + torch.tensor([0.0, 1.0, 0.0]), common + torch.tensor([0.0, -1.0, 0.0])])
    router = HiddenRouter(torch.stack([centroids, centroids]))  # layers 0 and 1
    sims = router.similarities(1, (common + torch.tensor([0.0, 0.5, 0.0])).unsqueeze(0))
    assert sims[0, 0] == pytest.approx(1.0) and sims[0, 1] == pytest.approx(-1.0)
    with pytest.raises(LoramixError, match="outside"):
        router.similarities(2, common.unsqueeze(0))


def test_the_first_route_is_the_prompts_own_mean_state_with_the_experts_off(hidden_mixture):
    result = hidden_mixture.generate(PROMPT, route="hidden:2/softmax:0.1", every_k=1, max_new_tokens=4)
    ids = hidden_mixture.tokenizer(PROMPT, return_tensors="pt")
    hidden_mixture.set_weights(None)
    with torch.no_grad():
        states = hidden_mixture.model(**ids, output_hidden_states=True).hidden_states[2]
    pooled = masked_mean(states.float(), ids.attention_mask)
    expected = softmax_weights(hidden_mixture.hidden_router.similarities(2, pooled), 0.1)[0]
    assert torch.allclose(result.weights[0], expected, atol=1e-5)
    assert result.reroutes == [0, 1, 2, 3]
    assert not torch.allclose(result.weights[0], result.weights[-1]), "the running mean moves with the answer"


def test_hidden_routed_sequences_in_a_batch_match_each_alone(hidden_mixture):
    options = [
        GenerationOptions(route="hidden:2/softmax:0.1", every_k=1, max_new_tokens=8, min_new_tokens=8),
        GenerationOptions(route="hidden:1/top1", every_k=2, decode="recompute", max_new_tokens=8, min_new_tokens=8),
        GenerationOptions(every_k=1, max_new_tokens=8, min_new_tokens=8),  # text routing beside them
    ]
    prompts = [PROMPT, "Write a function that adds two numbers.\n\nAnswer:", PROMPT]
    engine = Engine(hidden_mixture)
    sequences = [hidden_mixture.new_sequence(p, o, i) for i, (p, o) in enumerate(zip(prompts, options))]
    engine.add(sequences[0])
    engine.step()
    engine.step()
    for seq in sequences[1:]:
        engine.add(seq)
    while engine.busy:
        engine.step()
    for seq, prompt, option in zip(sequences, prompts, options):
        alone = hidden_mixture.generate(prompt, **vars(option))
        assert seq.token_ids == alone.token_ids
        assert torch.allclose(torch.stack(seq.weight_rows), alone.weights, atol=1e-6)


def test_hidden_routes_need_the_centroids_and_a_real_layer(tiny_bundle, hidden_mixture, tmp_path):
    older = tmp_path / "older"  # a bundle built before hidden-state centroids existed
    shutil.copytree(tiny_bundle, older)
    (older / HIDDEN_ROUTER_FILE).unlink()
    without = MixtureModel.from_bundle(older, embedder_dtype="fp32")
    for spec in ("hidden:1/top1", "hidden"):
        with pytest.raises(LoramixError, match="router hidden BUNDLE`, or choose a text route such as --route boost"):
            without.new_sequence(PROMPT, GenerationOptions(route=spec))
    for spec in ("hidden:9/top1", "hidden:-3/top1"):
        with pytest.raises(LoramixError, match="has 2 layers"):
            hidden_mixture.new_sequence(PROMPT, GenerationOptions(route=spec))
    for spec in ("hidden:0/top1", "hidden:x/top1", "hidden:2"):
        with pytest.raises(LoramixError, match="hidden:L/RULE"):
            hidden_mixture.new_sequence(PROMPT, GenerationOptions(route=spec))


def test_negative_layers_count_back_from_the_last_and_hidden_is_the_default(hidden_mixture):
    """hidden:-1 is the last layer, hidden:-2 the one before; `hidden` (the default route) is hidden:-2/softmax:0.05."""
    layers = hidden_mixture.model.config.num_hidden_layers
    assert GenerationOptions().route == "hidden" and GenerationOptions().every_k == 1
    assert hidden_mixture.new_sequence(PROMPT, GenerationOptions(route="hidden:-1/top1")).policy.hidden_layer == layers
    default = hidden_mixture.generate(PROMPT, max_new_tokens=8, min_new_tokens=8)
    spelled = hidden_mixture.generate(
        PROMPT, route=f"hidden:{layers - 1}/softmax:0.05", max_new_tokens=8, min_new_tokens=8
    )
    assert default.token_ids == spelled.token_ids
    assert torch.equal(default.weights, spelled.weights)
    assert len(default.reroutes) == 8  # every token


def test_the_prompts_routing_pass_stops_at_its_layer_and_equals_the_full_pass(hidden_mixture, monkeypatch):
    from loramix.mixture_model import decoder_layers

    ids = hidden_mixture.tokenizer([PROMPT], return_tensors="pt")
    mask = ids.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden_mixture.set_weights(None)  # experts off, as the routing pass runs
    with torch.no_grad():
        full = hidden_mixture.model(**ids, output_hidden_states=True).hidden_states
    layers = decoder_layers(hidden_mixture.model)
    last = len(layers)
    ran = []
    hook = layers[last - 1].register_forward_hook(lambda *_: ran.append(True))
    try:
        early = hidden_mixture.base_hidden_states(ids.input_ids, mask, positions, (1,))
        assert not ran  # the last layer never ran for a layer-1 route
        whole = hidden_mixture.base_hidden_states(ids.input_ids, mask, positions, (1, last))
        assert ran
    finally:
        hook.remove()
    assert torch.equal(early[1], full[1])
    assert torch.equal(whole[1], full[1]) and torch.equal(whole[last], full[last])  # the last is after the norm
