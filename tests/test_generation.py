"""The decoding loop: against the reference algorithm, between decode modes, batched vs one at a time."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from loramix.errors import LoramixError
from loramix.models import load_base_model

PROMPTS = [
    "Question: What is 2 + 3?\n\nAnswer:",
    "Write a function that adds two numbers.\n\nAnswer:",
    "Context:\nThe sky is blue.\n\nQuestion: What colour is the sky?\n\nAnswer:",
]


@pytest.fixture
def mixture(tiny_mixture):
    """The session's tiny mixture, put back to its defaults after each test."""
    yield tiny_mixture
    tiny_mixture.set_merge("exact")


def _peft_model(tiny_base, tiny_experts):
    model, tokenizer = load_base_model(str(tiny_base))
    peft_model = PeftModel.from_pretrained(model, str(tiny_experts[0]), adapter_name=tiny_experts[0].name)
    for path in tiny_experts[1:]:
        peft_model.load_adapter(str(path), adapter_name=path.name)
    return peft_model, tokenizer


def reference_loop(peft_model, tokenizer, embedder, centroids, prompt, n_tokens, combination, eos_ids):
    """The reference algorithm, plainly: for every token decode the whole text, embed it, weight the experts
    (largest cosine similarity x 4, softmax), build a merged PEFT adapter, run the whole text, take one token."""
    names = list(peft_model.peft_config)
    ids = tokenizer(prompt).input_ids
    unit_centroids = torch.nn.functional.normalize(centroids, dim=-1)
    for _ in range(n_tokens):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        similarities = embedder.embed([text])[0] @ unit_centroids.T
        boosted = similarities.clone()
        boosted[similarities.argmax()] *= 4.0
        weights = torch.softmax(boosted, dim=0).tolist()
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination)
        peft_model.set_adapter("merged")
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
        logits[eos_ids] = float("-inf")
        ids.append(int(logits.argmax()))
        peft_model.set_adapter(names[0])
        peft_model.delete_adapter("merged")
    return ids[len(tokenizer(prompt).input_ids) :]


@pytest.mark.parametrize("merge,combination", [("exact", "cat"), ("linear", "linear")])
def test_recompute_at_k1_produces_the_reference_loop_tokens(
    mixture, tiny_base, tiny_experts, embedder, merge, combination
):
    mixture.set_merge(merge)
    peft_model, tokenizer = _peft_model(tiny_base, tiny_experts)
    n = 10
    for prompt in PROMPTS[:2]:
        expected = reference_loop(
            peft_model, tokenizer, embedder, mixture.router.centroids, prompt, n, combination, mixture.eos_ids
        )
        ours = mixture.generate(
            prompt, route="paper", every_k=1, decode="recompute", max_new_tokens=n, min_new_tokens=n
        )
        assert ours.token_ids == expected
        assert ours.reroutes == list(range(n))


@pytest.mark.parametrize("route", ["uniform", "oracle:arc", "fixed:0.2,0.5,0.3", "prompt", "base"])
def test_cached_equals_recompute_when_weights_do_not_change(mixture, route):
    cached = mixture.generate(PROMPTS, route=route, decode="cached", every_k=1, max_new_tokens=12, min_new_tokens=12)
    recomputed = mixture.generate(
        PROMPTS, route=route, decode="recompute", every_k=1, max_new_tokens=12, min_new_tokens=12
    )
    for a, b in zip(cached, recomputed):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.weights, b.weights)


def test_recompute_reruns_the_whole_text_only_at_reroutes(mixture, monkeypatch):
    lengths = []
    original = mixture.forward

    def recording_forward(input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(mixture, "forward", recording_forward)
    prompt_length = len(mixture.tokenizer(PROMPTS[0]).input_ids)
    mixture.generate(PROMPTS[0], decode="recompute", every_k=3, max_new_tokens=7, min_new_tokens=7)
    # prefill, then before tokens 1..6: full re-runs before tokens 3 and 6, single tokens otherwise
    assert lengths == [prompt_length, 1, 1, prompt_length + 3, 1, 1, prompt_length + 6]
    lengths.clear()
    mixture.generate(PROMPTS[0], decode="cached", every_k=3, max_new_tokens=7, min_new_tokens=7)
    assert lengths == [prompt_length] + [1] * 6


@pytest.mark.parametrize("decode", ["cached", "recompute"])
def test_a_batch_equals_its_sequences_run_one_at_a_time(mixture, decode):
    batch = mixture.generate(PROMPTS, every_k=2, decode=decode, max_new_tokens=10, min_new_tokens=10)
    for prompt, batched in zip(PROMPTS, batch):
        alone = mixture.generate(prompt, every_k=2, decode=decode, max_new_tokens=10, min_new_tokens=10)
        assert batched.token_ids == alone.token_ids
        assert torch.allclose(batched.weights, alone.weights, atol=1e-5)
    assert not torch.allclose(batch[0].weights[0], batch[1].weights[0]), "each sequence is routed on its own text"


def test_sequences_that_finish_early_leave_the_batch_without_disturbing_the_others(mixture):
    """One sequence ends early (its own stop string); the others, with no stop string, run on unchanged."""
    from loramix.engine import Engine
    from loramix.sequences import GenerationOptions

    alone = [mixture.generate(p, max_new_tokens=10, min_new_tokens=10) for p in PROMPTS]
    stop = alone[1].text[2:4]
    assert stop, "the tiny model must produce some text"
    options = GenerationOptions(max_new_tokens=10, min_new_tokens=10)
    seqs = [mixture.new_sequence(p, options, i) for i, p in enumerate(PROMPTS)]
    stopping = GenerationOptions(max_new_tokens=10, min_new_tokens=10, stop=(stop,))
    seqs[1] = mixture.new_sequence(PROMPTS[1], stopping, 1)
    engine = Engine(mixture)
    for seq in seqs:
        engine.add(seq)
    batch_sizes = []
    while engine.busy:
        engine.step()
        batch_sizes.append(engine.running)
    assert seqs[1].finish_reason == "stop" and len(seqs[1].token_ids) < 10
    assert min(batch_sizes) < len(PROMPTS) < max(batch_sizes) + 1  # it left the batch while the others ran on
    for i in range(len(PROMPTS)):
        if i != 1:
            assert seqs[i].token_ids == alone[i].token_ids and seqs[i].finish_reason == "length"


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_reroutes_happen_exactly_every_k_tokens_and_rows_sum_to_one(mixture, k):
    result = mixture.generate(PROMPTS[0], every_k=k, max_new_tokens=11, min_new_tokens=11)
    assert result.reroutes == list(range(0, 11, k))
    assert result.weights.shape == (11, 3)
    assert torch.allclose(result.weights.sum(dim=1), torch.ones(11))
    for i in range(1, 11):  # weights change only at re-routes
        if i not in result.reroutes:
            assert torch.equal(result.weights[i], result.weights[i - 1])


def test_prompt_routing_routes_once(mixture):
    result = mixture.generate(PROMPTS[0], route="prompt", max_new_tokens=6, min_new_tokens=6)
    assert result.reroutes == [0]
    assert (result.weights == result.weights[0]).all()


def test_base_route_is_the_plain_base_model(mixture, tiny_base):
    ours = mixture.generate(PROMPTS[0], route="base", max_new_tokens=8, min_new_tokens=8)
    assert ours.reroutes == [] and not ours.weights.any()
    model, tokenizer = load_base_model(str(tiny_base))
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours.token_ids == out[0, ids.input_ids.shape[1] :].tolist()


def test_oracle_route_is_that_single_peft_adapter(mixture, tiny_base, tiny_experts):
    ours = mixture.generate(PROMPTS[1], route="oracle:arc", max_new_tokens=8, min_new_tokens=8)
    peft_model, tokenizer = _peft_model(tiny_base, tiny_experts)
    peft_model.set_adapter("arc")
    ids = tokenizer(PROMPTS[1], return_tensors="pt")
    out = peft_model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours.token_ids == out[0, ids.input_ids.shape[1] :].tolist()


def _force_eos(mixture, monkeypatch):
    original = mixture.forward

    def eos_loving_forward(*args, **kwargs):
        logits, cache, hidden = original(*args, **kwargs)
        logits[:, mixture.eos_ids[0]] += 1000.0
        return logits, cache, hidden

    monkeypatch.setattr(mixture, "forward", eos_loving_forward)


def test_eos_ends_a_sequence_and_min_new_tokens_holds_it_off(mixture, monkeypatch):
    _force_eos(mixture, monkeypatch)
    early = mixture.generate(PROMPTS[0], max_new_tokens=10)
    assert early.finish_reason == "eos" and early.token_ids == [mixture.eos_ids[0]]
    held = mixture.generate(PROMPTS[0], max_new_tokens=10, min_new_tokens=4)
    assert held.finish_reason == "eos" and len(held.token_ids) == 5
    assert mixture.eos_ids[0] not in held.token_ids[:4]


def test_length_limit_and_stop_strings(mixture):
    full = mixture.generate(PROMPTS[2], max_new_tokens=12, min_new_tokens=12)
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop = full.text[3:5]
    stopped = mixture.generate(PROMPTS[2], max_new_tokens=12, min_new_tokens=12, stop=(stop,))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_sampling_is_reproducible_with_a_seed(mixture):
    options = {"max_new_tokens": 12, "min_new_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    first = mixture.generate(PROMPTS[0], seed=3, **options)
    again = mixture.generate(PROMPTS[0], seed=3, **options)
    other = [mixture.generate(PROMPTS[0], seed=s, **options).token_ids for s in (4, 5, 6)]
    assert first.token_ids == again.token_ids
    assert any(tokens != first.token_ids for tokens in other)


def test_stream_yields_every_token_with_its_weights(mixture):
    stream = mixture.stream(PROMPTS[:2], every_k=3, max_new_tokens=7, min_new_tokens=7)
    events = list(stream)
    results = stream.results()
    for index, result in enumerate(results):
        mine = [e for e in events if e.sequence == index]
        assert [e.token_id for e in mine] == result.token_ids
        assert [e.index for e in mine if e.rerouted] == result.reroutes == [0, 3, 6]
        assert torch.allclose(torch.tensor([e.weights for e in mine]), result.weights)
        assert mine[-1].finished
    with pytest.raises(LoramixError, match="only once"):
        list(stream)


def test_result_json_has_the_documented_keys(mixture):
    result = mixture.generate(PROMPTS[0], every_k=2, max_new_tokens=5, min_new_tokens=5)
    payload = json.loads(json.dumps(result.to_json(mixture.expert_names)))  # what --json prints, read back
    assert payload["experts"] == mixture.expert_names
    assert payload["prompt_token_ids"] == mixture.tokenizer(PROMPTS[0]).input_ids
    assert payload["token_ids"] == result.token_ids and len(payload["token_ids"]) == 5
    assert payload["text"] == mixture.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert payload["tokens"] == mixture.tokenizer.convert_ids_to_tokens(result.token_ids)
    assert torch.allclose(torch.tensor(payload["weights"]), result.weights, atol=1e-6)
    assert payload["reroutes"] == [0, 2, 4] and payload["finish_reason"] == "length"
    timing = payload["timing"]
    assert timing["tokens"] == 5 and timing["total"] > 0 and timing["decode"] > 0 and timing["routing"] >= 0
    assert timing["tokens_per_second"] == pytest.approx(5 / timing["total"], rel=1e-3)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"every_k": 0}, "--every-k must be a positive"),
        ({"every_k": -2}, "--every-k must be a positive"),
        ({"decode": "lazy"}, "Unknown decode mode"),
        ({"route": "coin-flip"}, "Unknown route rule"),
        ({"route": "oracle:nope"}, "no expert named"),
        ({"route": "fixed:1,2"}, "gives 2 weights"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be positive"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "--min-new-tokens"),
        ({"temperature": -1.0}, "--temperature"),
    ],
)
def test_bad_generation_options_are_refused_clearly(mixture, options, message):
    with pytest.raises(LoramixError, match=message):
        mixture.generate(PROMPTS[0], **options)


def test_empty_and_too_long_prompts_are_refused(mixture):
    with pytest.raises(LoramixError, match="empty"):
        mixture.generate("   ")
    with pytest.raises(LoramixError, match="context"):
        mixture.generate("word " * 2100, max_new_tokens=8)


def test_unknown_merge_mode_is_refused(mixture):
    with pytest.raises(LoramixError, match="Unknown merge mode"):
        mixture.set_merge("average")


def test_routing_freezes_past_the_embedder_limit_and_reuses_the_embedding(mixture):
    long_prompt = (
        "Context:\n" + "The river carries sand to the delta. " * 32 + "\n\nQuestion: What does it carry?\n\nAnswer:"
    )
    result = mixture.generate(long_prompt, route="paper", every_k=2, max_new_tokens=8, min_new_tokens=8)
    assert result.reroutes == [0, 2, 4, 6]
    assert result.frozen_reroutes == 4  # every routing step saw a text past the 256-piece limit
    assert result.reused_embeddings == 3  # so only the first one ran the embedder
    assert (result.weights == result.weights[0]).all()
    short = mixture.generate(PROMPTS[0], route="paper", every_k=2, max_new_tokens=8, min_new_tokens=8)
    assert short.frozen_reroutes == 0
