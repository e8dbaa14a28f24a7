"""Prompts prefilled packed end to end in one row (`loramix.packing`): the numbers of a padded prefill (to float
rounding), the keys and values in the same left-padded rows, and only where per-row weights allow it."""

from __future__ import annotations

import torch

from loramix import packing, runner
from loramix.generation import GenerationOptions, GenerationStream
from loramix.packing import (
    MAX_PACKED_TOKENS,
    PER_SEQUENCE_ATTENTION,
    _attention_per_sequence,
    attention_per_sequence,
    pack,
    unpack_cache,
    worth_packing,
)

ORIGINAL_PACKS = runner.ModelRunner._packs
PROMPTS = [
    "Question: What is 2 + 3?\n\nAnswer:",
    "Write a function that adds two numbers, and one that multiplies them.\n\nAnswer:",
    "Context:\nThe sky is blue.\n\nQuestion: What colour is the sky?\n\nAnswer:",
]


def test_a_packed_row_attends_within_each_prompt_only():
    packed = pack([[5, 6, 7], [8, 9]], torch.device("cpu"))
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9]] and packed.positions.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.rows.tolist() == [0, 0, 0, 1, 1] and packed.ends.tolist() == [2, 4]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(packed.mask[0, 0], expected.bool())


def test_packed_attention_takes_each_prompt_on_its_own_as_the_block_diagonal_mask_does():
    """Grouped heads (6 queries, 2 keys): each sequence's causal SDPA on its own equals SDPA of the whole row under
    the packed mask, to float rounding (sum(l^2) scores in place of T^2)."""
    generator = torch.Generator().manual_seed(0)
    packed = pack([[1] * 5, [2] * 9, [3] * 2], torch.device("cpu"))
    q = torch.randn(1, 6, 16, 8, generator=generator)
    k, v = torch.randn(2, 1, 2, 16, 8, generator=generator).unbind(0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=packed.mask, scale=0.4, enable_gqa=True)
    model = torch.nn.Module()
    model.config = type("Config", (), {"_attn_implementation": "sdpa"})()
    with attention_per_sequence(model, packed):
        assert model.config._attn_implementation == PER_SEQUENCE_ATTENTION
        ours, _ = _attention_per_sequence(None, q, k, v, packed.mask, scaling=0.4)
    assert model.config._attn_implementation == "sdpa"  # only for the packed pass
    assert torch.allclose(ours, dense.transpose(1, 2), atol=1e-6)


def test_packing_is_only_for_groups_that_padding_would_waste():
    assert worth_packing([10, 30]) and not worth_packing([30]) and not worth_packing([30, 30, 29])
    assert not worth_packing([MAX_PACKED_TOKENS // 2, MAX_PACKED_TOKENS // 2 + 1, 1])  # its mask would be too big


def test_unpacked_cache_is_left_padded_rows():
    class Layer:
        keys = torch.arange(5.0).view(1, 1, 5, 1)
        values = -torch.arange(5.0).view(1, 1, 5, 1)

    cache = type("Cache", (), {"layers": [Layer()]})()
    texts = [[1, 2, 3], [4, 5]]
    unpack_cache(cache, pack(texts, torch.device("cpu")))
    assert runner.left_pad(texts, pad_id=0)[1].tolist() == [[1, 1, 1], [0, 1, 1]]  # the rows' mask, as the runner's
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1, 2], [0, 3, 4]]
    assert cache.layers[0].values[:, 0, :, 0].tolist() == [[0, -1, -2], [0, -3, -4]]


def _first_steps(mixture, options, packing: bool, monkeypatch):
    """Every sequence's first two tokens with their log-probabilities and weights, packed or padded, and how many
    packed passes ran."""
    packs = ORIGINAL_PACKS
    calls = []
    monkeypatch.setattr(runner.ModelRunner, "_packs",
                        lambda self, texts: calls.append(packs(self, texts)) or (packing and calls[-1]))  # fmt: skip
    stream = GenerationStream(mixture, PROMPTS, options)
    for _ in stream:
        pass
    return stream.results(), sum(calls) if packing else 0


def test_packed_prefill_gives_the_padded_prefills_tokens_and_numbers(tiny_mixture, monkeypatch):
    attended = []  # each layer of a packed pass attends each prompt on its own
    real = packing._attention_per_sequence
    monkeypatch.setattr(packing, "_attention_per_sequence", lambda *a, **k: attended.append(1) or real(*a, **k))
    for route in ("fixed:0.5,0.3,0.2", "hidden:1/softmax", "base"):
        options = GenerationOptions(route=route, max_new_tokens=6, min_new_tokens=6, logprobs=0)
        attended.clear()
        packed, used = _first_steps(tiny_mixture, options, True, monkeypatch)
        padded, _ = _first_steps(tiny_mixture, options, False, monkeypatch)
        assert used >= 1 and len(attended) >= 2, route  # the prompts' lengths differ enough: packed
        for ours, theirs in zip(packed, padded):
            assert ours.token_ids == theirs.token_ids, route
            assert max(abs(a - b) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-4
            assert torch.allclose(ours.weights, theirs.weights, atol=1e-5)


def test_merged_modes_and_in_layer_rules_are_never_packed(tiny_mixture, monkeypatch):
    """Their weights are per row of the batch, which a packed row does not have."""
    forwards = []
    forward = tiny_mixture.forward
    monkeypatch.setattr(tiny_mixture, "forward", lambda *a, **k: forwards.append(k.get("packed")) or forward(*a, **k))
    for options in (GenerationOptions(merge="linear", route="uniform"), GenerationOptions(route="arrow")):
        forwards.clear()
        list(GenerationStream(tiny_mixture, PROMPTS, options.__class__(**{**vars(options), "max_new_tokens": 2})))
        assert forwards and all(packed is None for packed in forwards)
