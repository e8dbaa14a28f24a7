"""Routing inside each layer (`route=arrow`): exact prototypes, the top-k softmax, the engine against PEFT's own Arrow,
and rows routed this way batched beside rows of any other route."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loramix.errors import LoramixError
from loramix.generation import GenerationOptions, GenerationStream
from loramix.layer_router import arrow_weights, top_right_singular_vector
from loramix.mixture import MixtureLinear

PROMPTS = ["Question: What is 2 + 3?\n\nAnswer:", "Write a function that adds two numbers.\n\nAnswer:"]


def test_the_prototype_is_the_top_right_singular_vector_of_the_delta():
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 32, generator=generator), torch.randn(24, 4, generator=generator)
    expected = torch.linalg.svd(B @ A).Vh[0]
    ours = top_right_singular_vector(A, B)
    assert torch.allclose(ours.abs(), expected.abs(), atol=1e-5) and abs(float(ours @ expected)) == pytest.approx(1)
    assert not top_right_singular_vector(torch.zeros(4, 32), B).any()  # an expert that does not adapt this layer


def test_weights_are_a_softmax_over_the_top_k_by_absolute_similarity():
    prototypes = torch.eye(4)
    x = torch.tensor([[3.0, -2.0, 0.5, 0.1]])
    weights = arrow_weights(x, prototypes, top_k=2, temperature=1.0)
    expected = torch.tensor([3.0, 2.0]).softmax(dim=0)
    assert torch.allclose(weights[0, :2], expected) and weights[0, 2:].eq(0).all()  # sign ignored, the rest 0


def _peft_prototypes_into_ours(mixture, arrow_model) -> None:
    """Our layers take PEFT's prototypes (power iteration, 15 steps), so the comparison below is of the routing
    and the mixing, the same maths on the same vectors. Most of PEFT's are our exact ones; a few are not, where an
    expert's top two singular values lie close and 15 steps from a random start do not separate them."""
    ours = {name: m for name, m in mixture.model.named_modules() if isinstance(m, MixtureLinear)}
    agreement = []
    for name, module in arrow_model.named_modules():
        routers = getattr(module, "lora_arrow", None)
        router = (
            routers["arrow_router"] if isinstance(routers, torch.nn.ModuleDict) and "arrow_router" in routers else None
        )
        if router is None or not hasattr(router, "prototypes"):
            continue
        key = name.split("base_model.model.", 1)[-1]
        if key in ours:
            cosines = torch.nn.functional.cosine_similarity(ours[key].prototypes, router.prototypes.float(), dim=-1)
            agreement += (cosines.abs() > 0.999).tolist()
            ours[key].prototypes.copy_(router.prototypes)
    assert len(agreement) >= 12 and sum(agreement) >= 0.75 * len(agreement), agreement


def test_arrow_in_the_engine_gives_pefts_arrow_tokens_and_batches_beside_other_routes(tiny_mixture, tiny_bundle):
    from loramix.baselines import ArrowBaseline
    from loramix.bundle import Bundle

    arrow = ArrowBaseline(Bundle.load(tiny_bundle))
    torch.manual_seed(0)  # PEFT's power iteration starts from a random vector: the same one whatever ran before
    reference = arrow.generate(PROMPTS, max_new_tokens=8)  # builds PEFT's prototypes on its first pass
    saved = {n: m.prototypes.clone() for n, m in tiny_mixture.model.named_modules() if isinstance(m, MixtureLinear)}
    try:
        _peft_prototypes_into_ours(tiny_mixture, arrow.model)
        ours = tiny_mixture.generate(PROMPTS, route="arrow", max_new_tokens=8, min_new_tokens=8)
        for mine, theirs in zip(ours, reference):
            assert mine.token_ids == theirs.token_ids[: len(mine.token_ids)]
            assert torch.allclose(mine.weights.sum(dim=1), torch.ones(len(mine.token_ids)), atol=1e-5)
        hidden = GenerationOptions(max_new_tokens=8, min_new_tokens=8)
        per_prompt = [replace(hidden, route="arrow"), hidden]
        beside = GenerationStream(tiny_mixture, PROMPTS, hidden, per_prompt=per_prompt)
        for _ in beside:
            pass
        mixed = beside.results()
        assert mixed[0].token_ids == ours[0].token_ids  # the arrow row, beside a hidden-routed row
        alone = tiny_mixture.generate(PROMPTS[1], max_new_tokens=8, min_new_tokens=8)
        assert mixed[1].token_ids == alone.token_ids
    finally:
        for name, module in tiny_mixture.model.named_modules():
            if name in saved:
                module.prototypes.copy_(saved[name])


def test_arrow_needs_the_exact_merge(tiny_mixture):
    with pytest.raises(LoramixError, match="only the exact merge mode"):
        tiny_mixture.generate(PROMPTS[0], route="arrow", merge="linear", max_new_tokens=2)


def test_spectr_scores_are_the_deltas_norm_over_its_top_singular_value():
    """SpectR from h = A x and the block-diagonal G: ||B_i A_i x|| / sigma_i, computed against the full matrices."""
    from loramix.layer_router import expert_spectrum, spectr_scores, top_k_softmax

    generator = torch.Generator().manual_seed(1)
    ranks = [4, 2, 3]
    pairs = [(torch.randn(r, 32, generator=generator), torch.randn(24, r, generator=generator)) for r in ranks]
    pairs.append((torch.zeros(2, 32), torch.zeros(24, 2)))  # an expert that does not adapt this layer
    ranks.append(2)
    x = torch.randn(5, 32, generator=generator)
    h = torch.cat([x @ A.T for A, _ in pairs], dim=-1)
    gram = torch.block_diag(*[expert_spectrum(A, B)[1] for A, B in pairs])
    ours = spectr_scores(h, gram, ranks)
    expected = torch.stack(
        [(x @ (B @ A).T).norm(dim=-1) / torch.linalg.matrix_norm(B @ A, ord=2) for A, B in pairs[:3]]
        + [torch.zeros(5)],
        dim=-1,
    )
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-5)
    v = expert_spectrum(*pairs[0])[0]  # along the top direction, the score is Arrow's |<x, v>|
    along = torch.cat([(3 * v) @ A.T for A, _ in pairs], dim=-1)
    assert spectr_scores(along, gram, ranks)[0] == pytest.approx(3.0, rel=1e-4)
    weights = top_k_softmax(ours, 3, 1.0)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(5)) and weights[:, 3].eq(0).all()


def test_spectr_in_the_engine_batches_beside_other_routes_and_matches_alone(tiny_mixture):
    spectr = GenerationOptions(route="spectr", max_new_tokens=8, min_new_tokens=8)
    alone = tiny_mixture.generate(PROMPTS, spectr)
    arrow = tiny_mixture.generate(PROMPTS, replace(spectr, route="arrow"))
    assert any(a.token_ids != b.token_ids or not torch.allclose(a.weights, b.weights) for a, b in zip(alone, arrow))
    for result in alone:
        assert torch.allclose(result.weights.sum(dim=1), torch.ones(8), atol=1e-5)
    hidden = GenerationOptions(max_new_tokens=8, min_new_tokens=8)
    per_prompt = [spectr, replace(hidden, route="arrow")]
    beside = GenerationStream(tiny_mixture, PROMPTS, hidden, per_prompt=per_prompt)
    for _ in beside:
        pass
    mixed = beside.results()
    assert mixed[0].token_ids == alone[0].token_ids and torch.allclose(mixed[0].weights, alone[0].weights, atol=1e-6)
    assert mixed[1].token_ids == arrow[1].token_ids


def test_a_prior_adds_its_log_to_the_scores_and_a_flat_one_changes_nothing():
    from loramix.layer_router import layer_weights

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, generator=generator)
    prototypes = torch.randn(4, 8, generator=generator)
    rows = torch.tensor([1, 1]).view(-1, 1, 1)  # both rows Arrow
    unused = torch.zeros(2, 3, 4)
    flat = torch.full((2, 1, 4), 0.25).log()
    alone = arrow_weights(x, prototypes, top_k=3, temperature=1.0)
    assert torch.allclose(layer_weights(rows, (1,), x, unused, prototypes, None, [1] * 4, flat), alone, atol=1e-6)
    prior = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0]]).unsqueeze(1)
    ours = layer_weights(rows, (1,), x, unused, prototypes, None, [1] * 4, prior.log())
    scores = (x @ prototypes.T).abs() + prior.log()
    top = scores[0].topk(3, dim=-1)
    expected = torch.zeros(3, 4).scatter(-1, top.indices, top.values.softmax(dim=-1))
    assert torch.allclose(ours[0], expected, atol=1e-6) and not torch.allclose(ours[0], alone[0])
    assert torch.equal(ours[1], torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(3, 4))  # a one-hot prior decides alone


def test_a_prompt_prior_times_each_layers_evidence_in_the_engine(tiny_mixture):
    """prompt:RULE+spectr: routed once on the prompt, then per token in each layer under that prior. A one-hot
    prior (top1) is the prompt's expert alone in every layer; a soft one differs from both of its parts; rows of
    it batch beside other routes as alone."""
    options = GenerationOptions(max_new_tokens=6, min_new_tokens=6)
    top1 = tiny_mixture.generate(PROMPTS, replace(options, route="prompt:top1"))
    top1_in_layers = tiny_mixture.generate(PROMPTS, replace(options, route="prompt:top1+spectr"))
    for a, b in zip(top1, top1_in_layers):
        assert a.token_ids == b.token_ids and torch.equal(a.weights, b.weights)
    combined = replace(options, route="prompt:softmax:0.5+spectr")
    alone = tiny_mixture.generate(PROMPTS, combined)
    spectr = tiny_mixture.generate(PROMPTS, replace(options, route="spectr"))
    prompt = tiny_mixture.generate(PROMPTS, replace(options, route="prompt:softmax:0.5"))
    for result, in_layers, at_prompt in zip(alone, spectr, prompt):
        assert torch.allclose(result.weights.sum(dim=1), torch.ones(6), atol=1e-5)
        assert not torch.allclose(result.weights, in_layers.weights)
        assert not torch.allclose(result.weights, at_prompt.weights)
    beside = GenerationStream(tiny_mixture, PROMPTS, options, per_prompt=[replace(options, route="arrow"), combined])
    for _ in beside:
        pass
    assert beside.results()[1].token_ids == alone[1].token_ids
    assert torch.allclose(beside.results()[1].weights, alone[1].weights, atol=1e-6)


@pytest.mark.parametrize(
    ("route", "message"),
    [("prompt:softmax:0.1+peak", "after '\\+' comes a rule of each layer, arrow or spectr"),
     ("prompt:nonsense+spectr", "'nonsense' is not a routing rule")],
)  # fmt: skip
def test_a_combined_route_that_is_not_one_says_what_goes_where(tiny_mixture, route, message):
    with pytest.raises(LoramixError, match=message):
        tiny_mixture.generate(PROMPTS[0], route=route, max_new_tokens=2)
