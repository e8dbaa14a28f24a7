"""Routing rules, route specs and the embedding reuse once the embedder's input stops changing."""

from __future__ import annotations

import pytest
import torch

from loramix.errors import LoramixError
from loramix.router import CentroidRouter, RouteMemory, paper_weights, parse_route, softmax_weights, top1_weights

NAMES = ["gsm8k", "arc", "squad", "codealpaca"]


def test_paper_rule_matches_the_worked_example():
    weights = paper_weights(torch.tensor([[0.6, 0.3, 0.2, 0.1]]))
    assert torch.allclose(weights, torch.tensor([[0.75, 0.092, 0.083, 0.075]]), atol=5e-3)


def test_paper_rule_only_boosts_the_largest_and_is_never_one_hot():
    sims = torch.tensor([[0.1, 0.9, 0.2], [0.5, 0.5, 0.4]])
    weights = paper_weights(sims, temperature=4.0)
    assert weights[0].argmax() == 1 and weights[0].max() < 1.0
    expected = torch.softmax(torch.tensor([0.1, 3.6, 0.2]), dim=0)
    assert torch.allclose(weights[0], expected)


@pytest.mark.parametrize("rule", [paper_weights, softmax_weights, top1_weights])
def test_rules_give_rows_that_sum_to_one(rule):
    sims = torch.rand(5, 4) * 2 - 1
    weights = rule(sims)
    assert weights.shape == (5, 4)
    assert torch.allclose(weights.sum(dim=1), torch.ones(5))
    assert (weights >= 0).all()


def test_softmax_temperature_sharpens():
    sims = torch.tensor([[0.5, 0.4]])
    assert softmax_weights(sims, 0.01)[0, 0] > softmax_weights(sims, 1.0)[0, 0]


def test_parse_route_policies():
    assert parse_route("paper", NAMES).kind == "dynamic"
    assert parse_route("paper:2", NAMES).rule(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0, 0] == pytest.approx(
        torch.softmax(torch.tensor([2.0, 0, 0, 0]), 0)[0].item()
    )
    assert parse_route("prompt", NAMES).kind == "prompt"
    assert parse_route("prompt:top1", NAMES).kind == "prompt"
    assert parse_route("base", NAMES).kind == "base"
    assert parse_route("uniform", NAMES).fixed == (0.25, 0.25, 0.25, 0.25)
    assert parse_route("oracle:squad", NAMES).fixed == (0.0, 0.0, 1.0, 0.0)
    assert parse_route("fixed:1,1,1,1", NAMES).fixed == (1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nonsense", "Unknown route rule"),
        ("oracle:poetry", "no expert named 'poetry'"),
        ("fixed:0.5,0.5", "gives 2 weights but the bundle has 4 experts"),
        ("fixed:0.5,-0.1,0.3,0.3", "finite and not negative"),
        ("fixed:inf,0,0,0", "finite and not negative"),
        ("fixed:a,b,c,d", "must be numbers"),
        ("paper:hot", "not a number"),
        ("softmax:0", "must be positive"),
        ("prompt:bogus", "is not a routing rule"),
        ("gate:wide", "write gate:G"),
        ("prompt:gate:3+spectr", "between 0 and 2"),
    ],
)
def test_bad_route_specs_say_what_is_wrong(spec, message):
    with pytest.raises(LoramixError, match=message):
        parse_route(spec, NAMES)


def test_router_prefers_the_matching_centroid(embedder):
    centroids = embedder.embed(
        ["solve the arithmetic word problem", "python function code", "biology cell photosynthesis"]
    )
    router = CentroidRouter(embedder, centroids)
    outcome = router.similarities(["def add(a, b): return a + b  # python function"])
    assert outcome.similarities[0].argmax() == 1


def test_embedding_is_reused_once_the_truncated_input_stops_changing(embedder):
    router = CentroidRouter(embedder, torch.randn(2, embedder.dim))
    long_text = "The cell membrane controls what enters the cell. " * 80  # far past 256 word pieces
    memory, other = RouteMemory(), RouteMemory()
    first = router.similarities([long_text], [memory])
    second = router.similarities([long_text + " More text."], [memory])
    assert first.reused == [False] and second.reused == [True]
    assert first.at_limit == second.at_limit == [True]
    assert torch.equal(first.similarities, second.similarities)
    assert router.stats.embedded == 1 and router.stats.reused == 1
    # a short text that grows does change the embedding, and is re-embedded
    short = router.similarities(["Short text."], [other])
    grown = router.similarities(["Short text. Longer now."], [other])
    assert grown.reused == [False] and short.at_limit == grown.at_limit == [False]
    # a short text that only gains white space keeps its word pieces: reused, yet not frozen
    spaced = router.similarities(["Short text. Longer now.\n\n"], [other])
    assert spaced.reused == [True] and spaced.at_limit == [False]


def test_reused_embedding_equals_a_fresh_one(embedder):
    long_text = "Rivers carry sediment to the sea. " * 90
    router = CentroidRouter(embedder, torch.randn(3, embedder.dim))
    memory = RouteMemory()
    router.similarities([long_text], [memory])
    cached = router.similarities([long_text + " Extra."], [memory]).similarities
    fresh = CentroidRouter(embedder, router.centroids).similarities([long_text + " Extra."]).similarities
    assert torch.allclose(cached, fresh, atol=1e-6)


def test_centroid_dimension_must_match_the_embedder(embedder):
    with pytest.raises(LoramixError, match="rebuild the router"):
        CentroidRouter(embedder, torch.randn(4, 17))


def test_bf16_routing_stays_within_2e4_of_fp32():
    from loramix.router import Embedder

    texts = [
        "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\n\nAnswer:",
        "Write a Python function that reverses a string.\n\nAnswer: def reverse(s): return s[::-1]",
        "Context:\nThe Nile is the longest river in Africa.\n\nQuestion: Which river is longest?\n\nAnswer:",
    ]
    exact, fast = Embedder(dtype="fp32"), Embedder(dtype="bf16")
    assert exact.dtype == "fp32" and fast.dtype == "bf16"
    features, _ = exact.truncated_ids(texts)
    a, b = exact.embed_features(features), fast.embed_features(features)
    assert (1 - (a * b).sum(dim=-1)).abs().max() < 2e-4
    assert not torch.equal(a, b), "bf16 autocast must actually be in effect"


def test_unknown_embedder_dtype():
    from loramix.router import Embedder

    with pytest.raises(LoramixError, match="Unknown embedder dtype"):
        Embedder(dtype="int4")


def test_a_text_past_the_limit_for_good_is_not_even_decoded_again(embedder):
    router = CentroidRouter(embedder, torch.randn(2, embedder.dim))
    asked = []
    texts = {"long": "Glaciers carve valleys over thousands of years. " * 70, "short": "A short prompt."}

    keys = ["long", "short"]
    memories = [RouteMemory(), RouteMemory()]

    def text_for(i):
        asked.append(keys[i])
        return texts[keys[i]]

    first = router.route(memories, text_for)
    texts["long"] += " and more words"
    texts["short"] += " Now longer."
    second = router.route(memories, text_for)
    assert asked == ["long", "short", "short"]
    assert torch.equal(first.similarities[0], second.similarities[0])
    assert second.reused == [True, False] and second.at_limit == [True, False]
    fresh = CentroidRouter(embedder, router.centroids).similarities([texts["long"]])
    assert torch.allclose(fresh.similarities[0], second.similarities[0], atol=1e-6), "the saving is exact"


def test_a_text_that_only_just_reaches_the_limit_is_not_frozen_for_good(embedder):
    router = CentroidRouter(embedder, torch.randn(2, embedder.dim))
    assert not router._frozen_for_good("word " * 250 + "ending")  # the stable prefix has fewer than 254 pieces
    assert router._frozen_for_good("word " * 300 + "ending")


def test_gate_commits_to_the_leader_only_when_it_leads_clearly():
    similarities = torch.tensor([[0.50, 0.30, 0.10, 0.00], [0.30, 0.25, 0.10, 0.00], [0.40, 0.20, 0.40, 0.00]])
    weights = parse_route("gate:0.15", NAMES).rule(similarities)
    assert torch.equal(weights[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # leads by 0.20
    assert torch.equal(weights[1], torch.full((4,), 0.25)) and torch.equal(weights[2], torch.full((4,), 0.25))
    policy = parse_route("prompt:gate:0.15+spectr", NAMES)
    assert (policy.kind, policy.layer_rule) == ("prompt", "spectr")
    assert torch.equal(policy.rule(similarities), weights)


def test_topk_keeps_the_k_most_similar_experts_and_renormalises():
    sims = torch.tensor([[0.6, 0.3, 0.2, 0.1]])
    weights = parse_route("topk:2:0.1", NAMES).rule(sims)
    assert weights[0, 2:].tolist() == [0.0, 0.0]
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[0, 0] / weights[0, 1] == pytest.approx(float(torch.exp(torch.tensor(3.0))), rel=1e-4)
    assert torch.equal(parse_route("topk:1", NAMES).rule(sims), top1_weights(sims))


def test_a_window_routes_on_the_recent_tokens_and_the_prompts_start():
    policy = parse_route("window:3+2/softmax:0.05", NAMES)
    assert policy.kind == "dynamic" and policy.window == 3 and policy.window_head == 2
    prompt, generated = [1, 2, 3, 4], [5, 6, 7, 8]
    assert policy.routing_ids(prompt, generated) == [1, 2, 6, 7, 8]
    assert policy.routing_ids(prompt, []) == [1, 2, 3, 4], "a text shorter than head + window is routed whole"
    assert parse_route("window:2/top1", NAMES).routing_ids(prompt, generated) == [7, 8]
    assert parse_route("paper", NAMES).routing_ids(prompt, generated) == prompt + generated


@pytest.mark.parametrize("spec", ["window:0/top1", "window:8", "window:x/top1", "window:8/magic", "topk:0", "topk:two"])
def test_bad_window_and_topk_routes(spec):
    with pytest.raises(LoramixError):
        parse_route(spec, NAMES)


def test_a_windowed_sequence_is_never_frozen_for_good(embedder):
    from loramix.router import RouteMemory

    router = CentroidRouter(embedder, torch.randn(2, embedder.dim))
    long_text = "Glaciers carve valleys over thousands of years. " * 70
    fixed, sliding = RouteMemory(), RouteMemory(sliding=True)
    router.similarities([long_text, long_text], [fixed, sliding])
    assert fixed.frozen is not None and sliding.frozen is None
