"""Continuous batching: a sequence's tokens do not depend on what else runs beside it, or when it joined."""

from __future__ import annotations

import pytest
import torch

from loramix.engine import Engine
from loramix.errors import LoramixError
from loramix.generation import GenerationOptions

PROMPTS = [
    "Question: What is 2 + 3?\n\nAnswer:",
    "Write a function that adds two numbers.\n\nAnswer:",
    "Context:\nThe sky is blue.\n\nQuestion: What colour is the sky?\n\nAnswer:",
    "Question: Which gas do plants take in?\nChoices: A. oxygen\nB. carbon dioxide\n\nAnswer:",
]

# Each request its own settings: they share one batch (or one lane per merge mode) all the same.
REQUESTS = [
    (PROMPTS[0], GenerationOptions(every_k=1, max_new_tokens=14, min_new_tokens=14)),
    (PROMPTS[1], GenerationOptions(every_k=3, route="softmax", max_new_tokens=9, min_new_tokens=9)),
    (PROMPTS[2], GenerationOptions(every_k=2, decode="recompute", max_new_tokens=12, min_new_tokens=12)),
    (PROMPTS[3], GenerationOptions(route="prompt:top1", merge="linear", max_new_tokens=10, min_new_tokens=10)),
    (PROMPTS[0], GenerationOptions(route="base", max_new_tokens=6, min_new_tokens=6)),
    (PROMPTS[1], GenerationOptions(route="uniform", merge="paper", max_new_tokens=8, min_new_tokens=8)),
    (PROMPTS[2], GenerationOptions(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=10, min_new_tokens=10)),
    (PROMPTS[3], GenerationOptions(every_k=1, route="window:6+3/topk:2", max_new_tokens=10, min_new_tokens=10)),
]


def alone(mixture, prompt, options):
    return mixture.generate(prompt, **vars(options))


def run_staggered(mixture, requests, join_at, max_batch=None):
    """Add request i before step join_at[i]; step until all are done. Returns the sequences in request order."""
    engine = Engine(mixture, max_batch=max_batch)
    sequences = [mixture.new_sequence(p, o, i) for i, (p, o) in enumerate(requests)]
    step = 0
    while step <= max(join_at) or engine.busy:
        for seq, at in zip(sequences, join_at):
            if at == step:
                engine.add(seq)
        engine.step()
        step += 1
    return sequences, engine


def test_requests_joining_at_different_steps_match_each_run_alone(tiny_mixture):
    sequences, engine = run_staggered(tiny_mixture, REQUESTS, join_at=[0, 0, 2, 3, 3, 5, 7, 4])
    assert set(engine.lanes) == {"exact", "linear", "paper"}
    for seq, (prompt, options) in zip(sequences, REQUESTS):
        expected = alone(tiny_mixture, prompt, options)
        assert seq.token_ids == expected.token_ids, (prompt, options)
        assert torch.allclose(torch.stack(seq.weight_rows), expected.weights)
        assert seq.reroutes == expected.reroutes
    assert engine.running == 0 and all(not lane.rows for lane in engine.lanes.values())


def test_a_full_batch_queues_the_rest_and_still_matches(tiny_mixture):
    requests = REQUESTS[:4]
    sequences, engine = run_staggered(tiny_mixture, requests, join_at=[0, 0, 0, 0], max_batch=2)
    for seq, (prompt, options) in zip(sequences, requests):
        assert seq.token_ids == alone(tiny_mixture, prompt, options).token_ids


def test_a_cancelled_sequence_leaves_and_the_others_are_undisturbed(tiny_mixture):
    engine = Engine(tiny_mixture)
    requests = REQUESTS[:3]
    sequences = [tiny_mixture.new_sequence(p, o, i) for i, (p, o) in enumerate(requests)]
    for seq in sequences:
        engine.add(seq)
    for _ in range(3):
        engine.step()
    engine.cancel(sequences[1])
    tokens_when_cancelled = len(sequences[1].token_ids)
    engine.step()
    lane = engine.lanes["exact"]
    assert sequences[1] not in lane.rows and engine.running == 2
    assert lane.cache.layers[0].keys.shape[0] == len(lane.rows)  # its cache rows are freed
    while engine.busy:
        engine.step()
    assert len(sequences[1].token_ids) == tokens_when_cancelled
    for i in (0, 2):
        assert sequences[i].token_ids == alone(tiny_mixture, *requests[i]).token_ids


def test_each_token_goes_out_before_the_pass_that_feeds_it(tiny_mixture, monkeypatch):
    """A step ends on the tokens it picked: the first token right after the prefill, each later one right after the
    pass that computed its logits, never one decode pass later."""
    engine = Engine(tiny_mixture)
    passes = []
    decode = engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode", lambda lane: passes.append(len(lane.rows)) or decode(lane))
    seq = tiny_mixture.new_sequence(PROMPTS[0], GenerationOptions(max_new_tokens=3, min_new_tokens=3), 0)
    engine.add(seq)
    assert [len(engine.step()), passes] == [1, []]  # prefill, first token: no decode pass yet
    assert [len(engine.step()), passes] == [1, [1]]
    assert [len(engine.step()), passes] == [1, [1, 1]] and seq.finished
    assert not engine.busy  # the last token is fed to no pass


def test_two_streams_interleaved_on_one_model_do_not_disturb_each_other(tiny_mixture):
    """Each stream's routing state is its own: stepping two alternately gives what each gives alone."""
    a = tiny_mixture.stream(PROMPTS[:2], every_k=1, max_new_tokens=10, min_new_tokens=10)
    b = tiny_mixture.stream(PROMPTS[2:], route="prompt", merge="linear", max_new_tokens=10, min_new_tokens=10)
    for _ in zip(iter(a), iter(b)):
        pass
    expected_a = tiny_mixture.generate(PROMPTS[:2], every_k=1, max_new_tokens=10, min_new_tokens=10)
    expected_b = tiny_mixture.generate(
        PROMPTS[2:], route="prompt", merge="linear", max_new_tokens=10, min_new_tokens=10
    )
    assert [r.token_ids for r in a.results()] == [r.token_ids for r in expected_a]
    assert [r.token_ids for r in b.results()] == [r.token_ids for r in expected_b]


def test_logprobs_are_those_of_the_chosen_tokens(tiny_mixture):
    seq = tiny_mixture.new_sequence(PROMPTS[0], GenerationOptions(max_new_tokens=5, min_new_tokens=5, logprobs=3))
    engine = Engine(tiny_mixture)
    engine.add(seq)
    events = []
    while engine.busy:
        events += engine.step()
    assert len(events) == 5 and all(e.logprob is not None and e.logprob <= 0 for e in events)
    for event in events:  # greedy: the chosen token is the likeliest alternative
        assert event.top_logprobs[0][0] == event.token_id
        assert event.top_logprobs[0][1] == pytest.approx(event.logprob)
        assert [lp for _, lp in event.top_logprobs] == sorted((lp for _, lp in event.top_logprobs), reverse=True)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=float("nan")), "top-p"),
        (dict(every_k=0), "every-k"),
        (dict(max_new_tokens=-3), "max-new-tokens"),
        (dict(max_new_tokens=1.5), "whole number"),
        (dict(merge="sum"), "merge mode"),
        (dict(logprobs=99), "logprobs"),
        (dict(route="oracle:nobody"), "no expert named"),
        (dict(route="fixed:1,2"), "3 experts"),
        (dict(max_new_tokens=5000), "context"),
    ],
)
def test_bad_options_are_refused_before_any_work(tiny_mixture, options, match):
    with pytest.raises(LoramixError, match=match):
        tiny_mixture.new_sequence(PROMPTS[0], GenerationOptions(**options))


# Long prompts (a few times the chunk) on every kind of route, so chunks cross both prefill stages.
LONG = [
    (PROMPTS[2] * 3, GenerationOptions(every_k=1, max_new_tokens=8, min_new_tokens=8)),  # hidden: two stages
    (PROMPTS[1] * 2, GenerationOptions(route="hidden:1/top1", decode="recompute", max_new_tokens=6, min_new_tokens=6)),
    (PROMPTS[3] * 2, GenerationOptions(route="paper", every_k=2, max_new_tokens=6, min_new_tokens=6)),
    (PROMPTS[0], GenerationOptions(route="uniform", max_new_tokens=6, min_new_tokens=6)),
]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_gives_the_tokens_of_unchunked(tiny_mixture, chunk):
    """A running sequence first (with nothing decoding, prompts are prefilled whole), then the long prompts, which
    are taken in chunks of `chunk` tokens across both prefill stages."""
    engine = Engine(tiny_mixture, prefill_chunk=chunk)
    first = tiny_mixture.new_sequence(PROMPTS[0], GenerationOptions(max_new_tokens=60, min_new_tokens=60), 9)
    engine.add(first)
    engine.step()
    sequences = [tiny_mixture.new_sequence(p, o, i) for i, (p, o) in enumerate(LONG)]
    for seq in sequences:
        engine.add(seq)
    while engine.busy:
        engine.step()
    for seq, (prompt, options) in zip(sequences, LONG):
        expected = alone(tiny_mixture, prompt, options)
        assert seq.token_ids == expected.token_ids, (chunk, prompt[:20])
        assert torch.allclose(torch.stack(seq.weight_rows), expected.weights, atol=1e-5)


def test_running_streams_get_a_token_every_step_while_a_long_prompt_is_prefilled(tiny_mixture):
    engine = Engine(tiny_mixture, prefill_chunk=8)
    running = tiny_mixture.new_sequence(PROMPTS[0], GenerationOptions(max_new_tokens=40, min_new_tokens=40))
    engine.add(running)
    while not running.token_ids:
        engine.step()
    long = tiny_mixture.new_sequence(PROMPTS[2] * 6, GenerationOptions(max_new_tokens=4, min_new_tokens=4), 1)
    engine.add(long)
    before = len(running.token_ids)
    steps = 0
    while not long.token_ids:
        engine.step()
        steps += 1
    assert steps > 4  # the long prompt took several steps (both stages, in chunks of 8)...
    assert len(running.token_ids) == before + steps  # ...and the running stream got a token at every one of them
    while engine.busy:
        engine.step()
    assert running.token_ids == alone(tiny_mixture, PROMPTS[0], running.options).token_ids
    assert long.token_ids == alone(tiny_mixture, PROMPTS[2] * 6, long.options).token_ids


def test_the_kv_budget_holds_back_newcomers_until_room_frees_up(tiny_mixture):
    options = GenerationOptions(max_new_tokens=6, min_new_tokens=6)
    sequences = [tiny_mixture.new_sequence(p, options, i) for i, p in enumerate(PROMPTS)]
    widest = max(seq.reservation() for seq in sequences)
    engine = Engine(tiny_mixture, max_batch_tokens=2 * widest)  # room for two at a time
    for seq in sequences:
        engine.add(seq)
    most = 0
    while engine.busy:
        engine.step()
        most = max(most, engine.running)
    assert most == 2
    for seq in sequences:
        assert seq.token_ids == alone(tiny_mixture, seq.prompt, options).token_ids
    assert engine.scheduler.fits_alone(sequences) == 4 * widest  # all four at once: over the budget
    assert engine.scheduler.fits_alone(sequences[:2]) is None


def test_a_sequence_whose_step_fails_ends_alone_and_the_others_go_on(tiny_mixture, monkeypatch):
    import loramix.engine as engine_module

    real = engine_module.choose_token
    doomed = tiny_mixture.new_sequence(PROMPTS[1], GenerationOptions(max_new_tokens=10, min_new_tokens=10), 1)

    def choose(logits, temperature, *args):
        if temperature == 0.5 and len(doomed.token_ids) == 3:  # only the doomed sequence samples at 0.5
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "choose_token", choose)
    doomed.options = GenerationOptions(max_new_tokens=10, min_new_tokens=10, temperature=0.5, seed=1)
    others = [tiny_mixture.new_sequence(p, o, i + 2) for i, (p, o) in enumerate(REQUESTS[:3])]
    engine = Engine(tiny_mixture)
    events = []
    for seq in [doomed, *others]:
        engine.add(seq)
    while engine.busy:
        events += engine.step()
    failures = [e for e in events if e.finish_reason == "error"]
    assert [e.sequence for e in failures] == [1] and "probability tensor" in failures[0].error
    assert doomed.finish_reason == "error" and len(doomed.token_ids) == 3
    monkeypatch.setattr(engine_module, "choose_token", real)
    for seq, (prompt, options) in zip(others, REQUESTS[:3]):
        assert seq.token_ids == alone(tiny_mixture, prompt, options).token_ids


def test_a_tiny_temperature_is_greedy_not_a_crash(tiny_mixture):
    tiny = tiny_mixture.generate(PROMPTS[0], temperature=1e-40, max_new_tokens=8, seed=3)
    assert tiny.token_ids == tiny_mixture.generate(PROMPTS[0], max_new_tokens=8).token_ids


def test_the_native_steps_cache_room_gives_the_tokens_of_transformers_cache_updates(tiny_bundle, monkeypatch):
    """fp16 weights with loramix's native library: each layer's keys and values grow in place, in room after them
    (`native_step._append`). Rows joining, leaving and re-running under new weights replace those tensors; the
    tokens and log-probabilities must be those of transformers' own cache update, step for step."""
    from loramix import native, native_step
    from loramix.generation import MixtureModel

    if native.library() is None:
        pytest.skip("no native library here (no C++ compiler, or not x86)")
    mixture = MixtureModel.from_bundle(tiny_bundle, device="cpu", dtype="fp16", embedder_dtype="fp32")
    assert mixture.decoder is not None and mixture.decoder.native is not None
    requests = [(prompt, GenerationOptions(**{**vars(options), "logprobs": 0})) for prompt, options in REQUESTS]
    join_at = [0, 0, 2, 3, 3, 5, 7, 4]
    with_room, _ = run_staggered(mixture, requests, join_at)
    monkeypatch.setattr(native_step, "_append", lambda cache, index, key, value: cache.update(key, value, index))
    without, _ = run_staggered(mixture, requests, join_at)
    for ours, theirs in zip(with_room, without):
        assert ours.error is None and theirs.error is None, (ours.error, theirs.error)
        assert ours.token_ids == theirs.token_ids and ours.token_logprobs == theirs.token_logprobs


def test_greedy_rows_of_a_lane_are_picked_together_and_a_row_of_nan_ends_alone(tiny_mixture, monkeypatch):
    """Greedy tokens come from one argmax over the lane's rows (`sampler.greedy_tokens`), the tokens `choose_token`
    gives row by row; a row whose logits are not finite ends with the sampler's error, the others go on."""
    from loramix import sampler

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator)
    logits[1, 7], logits[3, 2] = float("nan"), float("inf")
    assert sampler.greedy_tokens(logits) == [sampler.choose_token(logits[0], 0.0), None,
                                             sampler.choose_token(logits[2], 0.0), None]  # fmt: skip
    from loramix.runner import ModelRunner

    real_decode = ModelRunner.decode
    doomed = tiny_mixture.new_sequence(PROMPTS[1], GenerationOptions(max_new_tokens=8), 1)

    def decode_with_a_broken_row(runner, lane):
        real_decode(runner, lane)
        for row, seq in enumerate(lane.rows):
            if seq is doomed and len(seq.token_ids) == 2:
                lane.logits[row, 5] = float("nan")

    monkeypatch.setattr(ModelRunner, "decode", decode_with_a_broken_row)
    others = [tiny_mixture.new_sequence(p, o, i + 2) for i, (p, o) in enumerate(REQUESTS[:2])]
    engine = Engine(tiny_mixture)
    for seq in [doomed, *others]:
        engine.add(seq)
    events = []
    while engine.busy:
        events += engine.step()
    failures = [e for e in events if e.finish_reason == "error"]
    assert [e.sequence for e in failures] == [1] and "not finite" in failures[0].error
    assert len(doomed.token_ids) == 2
    monkeypatch.undo()
    for seq, (prompt, options) in zip(others, REQUESTS[:2]):
        assert seq.token_ids == alone(tiny_mixture, prompt, options).token_ids
