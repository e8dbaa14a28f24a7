"""The lean decode step (`loramix.decode_step`): transformers' numbers bit for bit, in every merge mode and in-layer
rule, with padding and captured hidden states; built only for the models it fits, and only once it is equal."""

from __future__ import annotations

import pytest
import torch

from helpers import make_random_expert, make_tiny_base
from loramix import decode_step, native
from loramix.adapters import load_expert
from loramix.cpu_kernels import HALF_KERNEL_MAX_ROWS, fbgemm_fp16_available, pack_fp16_linears
from loramix.decode_step import LeanDecoder
from loramix.mixture_model import RoutedModel
from loramix.models import load_base_model

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def every_projection(tmp_path_factory):
    """A tiny Llama whose two experts adapt all seven projections (so every product of a layer mixes)."""
    root = tmp_path_factory.mktemp("lean")
    base = make_tiny_base(root / "base", seed=3)
    experts = [make_random_expert(base, root / f"e{i}", seed=10 + i, targets=ALL_PROJECTIONS) for i in range(2)]
    return base, experts


def _mixture(every_projection, half: bool = False) -> RoutedModel:
    base, experts = every_projection
    model, tokenizer = load_base_model(str(base), dtype=torch.float32, device="cpu")
    if half:
        pack_fp16_linears(model)
    return RoutedModel(model, tokenizer, [load_expert(path) for path in experts], router=None)


def _decode_both_ways(
    mixture: RoutedModel, merge: str, rows: int = 3, layer_rows=None, capture=(0, 1, 2), padded: bool = True
):
    """A padded prefill, then one decode pass with and without the lean step: (logits, hidden, layer weights) each."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, mixture.model.config.vocab_size, (rows, 7), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3], mask[1, :1] = 0, 0  # rows of three lengths, left-padded as a joined batch is
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    weights = torch.rand(rows, len(mixture.expert_names), generator=generator).softmax(dim=-1)
    lean, results = mixture.decoder, []
    for decoder in (None, lean):
        mixture.decoder = decoder
        _, cache, _ = mixture.forward(ids[:, :6], mask[:, :6], positions[:, :6], None, weights, merge, (), layer_rows)
        logits, _, hidden = mixture.forward(
            ids[:, 6:], mask, positions[:, 6:], cache, weights, merge, capture, layer_rows
        )
        results.append((logits, hidden, mixture.last_layer_weights))
    mixture.decoder = lean
    return results


@pytest.mark.parametrize(("merge", "padded"), [("exact", True), ("linear", True), ("paper", True), ("exact", False)])
def test_lean_step_is_transformers_bit_for_bit_in_every_merge_mode(every_projection, merge, padded):
    """Padded rows take SDPA with the padding mask; a batch without padding takes it unmasked, as transformers."""
    mixture = _mixture(every_projection)
    assert mixture.decoder is not None
    (full, full_hidden, _), (lean, lean_hidden, _) = _decode_both_ways(mixture, merge, padded=padded)
    assert torch.equal(lean, full)
    assert sorted(lean_hidden) == [0, 1, 2]  # layer 2 of 2: transformers' last hidden state, after the final norm
    assert all(torch.equal(lean_hidden[layer], full_hidden[layer]) for layer in full_hidden)


def test_lean_step_keeps_in_layer_routing_and_its_recorded_weights(every_projection):
    mixture = _mixture(every_projection)
    layer_rows = torch.tensor([1, 0, 2])  # arrow, the pass's own weights, spectr (LAYER_RULES' codes)
    (full, _, full_weights), (lean, _, lean_weights) = _decode_both_ways(mixture, "exact", layer_rows=layer_rows)
    assert torch.equal(lean, full)
    assert full_weights is not None and torch.equal(lean_weights, full_weights)


def _sdpa_threads(monkeypatch) -> list[int]:
    """The thread count of every SDPA call from now on (it runs once a layer, full path or lean)."""
    threads, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: threads.append(torch.get_num_threads()) or sdpa(*a, **k))  # fmt: skip
    return threads


def _on_threads(count: int, action):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return action()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not fbgemm_fp16_available(), reason="FBGEMM's fp16 product is x86 (AVX2) only")
def test_fp16_weights_step_on_one_thread_through_the_kernels_equal_to_transformers_there(every_projection, monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)  # torch's one-thread FBGEMM, torch's operators
    mixture = _mixture(every_projection, half=True)
    assert mixture.decoder.half_weights and mixture.decoder.fast is not mixture.decoder.plain
    assert mixture.decoder.native is None
    threads = _sdpa_threads(monkeypatch)
    # the full path on one thread: the same reductions, so the same bits
    (full, _, _), (lean, _, _) = _on_threads(1, lambda: _decode_both_ways(mixture, "exact"))
    assert torch.equal(lean, full)
    threads.clear()
    few = _on_threads(2, lambda: _decode_both_ways(mixture, "exact", rows=2)) and list(threads)
    threads.clear()
    many = _on_threads(2, lambda: _decode_both_ways(mixture, "exact", rows=HALF_KERNEL_MAX_ROWS + 1)) and list(threads)
    # each call: prefill (2 layers, full path) then decode, full path then lean; only the lean decode is on one thread
    assert few[-2:] == [1, 1] and set(few[:-2]) == {2}
    assert set(many) == {2}  # more rows than torch's one-thread FBGEMM is used for: module products on every thread


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal to float rounding: within 1e-5 of the largest magnitude (fp32 sums in another order)."""
    return bool((ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max())))


@pytest.mark.skipif(native.library() is None, reason="no native library here (no C++ compiler, or not x86)")
@pytest.mark.parametrize(
    ("merge", "padded", "layer_rows"),
    [("exact", True, None), ("exact", False, None), ("linear", True, None), ("paper", True, None),
     ("exact", True, [1, 0, 2])],
)  # fmt: skip
def test_fp16_weights_step_in_native_kernels_agrees_with_transformers(every_projection, merge, padded, layer_rows):
    """Every merge mode, padding and the in-layer rules: logits, captured hidden states and each layer's weights
    to float rounding (the norms and softmax sum in another order), and the same greedy tokens."""
    mixture = _mixture(every_projection, half=True)
    assert mixture.decoder.native is not None
    rows = torch.tensor(layer_rows) if layer_rows else None
    (full, full_hidden, full_weights), (lean, lean_hidden, lean_weights) = _decode_both_ways(
        mixture, merge, padded=padded, layer_rows=rows
    )
    assert _close(lean, full) and torch.equal(lean.argmax(-1), full.argmax(-1))
    assert sorted(lean_hidden) == [0, 1, 2] and all(_close(lean_hidden[i], full_hidden[i]) for i in full_hidden)
    if layer_rows:
        assert _close(lean_weights, full_weights)


def _random_model(model_type: str, **changes) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **changes,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize(("model_type", "changes"), [("qwen2", {}), ("mistral", {"sliding_window": None})])
def test_other_llama_shaped_models_step_bit_for_bit(model_type, changes):
    """Qwen2 (q/k/v with biases) and Mistral without a sliding window have Llama's layers: a padded decode step."""
    from transformers import DynamicCache

    model = _random_model(model_type, **changes)
    decoder = LeanDecoder.build(model)
    assert decoder is not None
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    with torch.no_grad():
        for lean in (False, True):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], cache=cache)
            if lean:
                logits.append(decoder.step(ids[:, 5:], mask, positions[:, 5:], cache)[0])
            else:
                out = model(input_ids=ids[:, 5:], attention_mask=mask, position_ids=positions[:, 5:], cache=cache)
                logits.append(out.logits[:, -1, :].float())
    assert torch.equal(logits[0], logits[1])


def test_models_of_another_shape_get_no_lean_step(monkeypatch):
    """Qwen3 normalises queries and keys inside attention: were it let through as a Llama-shaped model, the check
    against transformers' step refuses it. A sliding window (Mistral's default) is refused from the config."""
    qwen3 = _random_model("qwen3")
    assert LeanDecoder.build(qwen3) is None
    monkeypatch.setattr(decode_step, "LEAN_MODEL_TYPES", (*decode_step.LEAN_MODEL_TYPES, "qwen3"))
    assert decode_step._plain_llama(qwen3, qwen3.config) and not LeanDecoder(qwen3).check()
    assert LeanDecoder.build(qwen3) is None
    assert LeanDecoder.build(_random_model("mistral", sliding_window=4)) is None


def test_built_only_for_plain_llamas(every_projection, tmp_path):
    assert LeanDecoder.build(_mixture(every_projection).model) is not None
    neox = make_tiny_base(tmp_path / "neox", architecture="gpt_neox")
    model, _ = load_base_model(str(neox), dtype=torch.float32, device="cpu")
    assert LeanDecoder.build(model) is None
    base, _ = every_projection
    model, _ = load_base_model(str(base), dtype=torch.float32, device="cpu")
    model.config.hidden_act = "gelu"  # a layer shape the lean step does not run
    assert LeanDecoder.build(model) is None


def test_a_step_that_differs_from_transformers_is_never_used(every_projection, monkeypatch):
    model, _ = load_base_model(str(every_projection[0]), dtype=torch.float32, device="cpu")
    rope = decode_step._rope_factors
    monkeypatch.setattr(decode_step, "_rope_factors", lambda cos, sin: rope(cos, -sin))  # rotating the wrong way
    assert LeanDecoder.build(model) is None


@pytest.mark.skipif(native.library() is None, reason="no native library here (no C++ compiler, or not x86)")
@pytest.mark.parametrize("padded", [False, True])
def test_short_prefills_in_native_kernels_agree_with_transformers(every_projection, padded):
    """A prompt of several tokens a row (left-padded rows among them), then a chunk of four more on its cache: the
    native step's logits, captured hidden states and the next decode step agree with transformers' to float
    rounding; merged modes keep transformers' prefill."""
    from loramix.native_step import native_prefill

    mixture = _mixture(every_projection, half=True)
    generator = torch.Generator().manual_seed(5)
    rows = 3 if padded else 1
    ids = torch.randint(3, mixture.model.config.vocab_size, (rows, 12), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5], mask[2, :2] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    weights = torch.rand(rows, len(mixture.expert_names), generator=generator).softmax(dim=-1)
    results, lean = [], mixture.decoder
    mixture.set_weights(weights)
    assert lean.native is not None and native_prefill(lean, ids[:, :8], mask[:, :8], mixture.state)
    for decoder in (None, lean):
        mixture.decoder = decoder
        first, cache, hidden = mixture.forward(
            ids[:, :8], mask[:, :8], positions[:, :8], None, weights, "exact", (1, 2)
        )
        chunk, cache, _ = mixture.forward(ids[:, 8:11], mask[:, :11], positions[:, 8:11], cache, weights, "exact")
        step, _, _ = mixture.forward(ids[:, 11:], mask, positions[:, 11:], cache, weights, "exact")
        results.append((first, hidden, chunk, step))
    mixture.decoder = lean
    (first, hidden, chunk, step), (ours_first, ours_hidden, ours_chunk, ours_step) = results
    for ours, theirs in ((ours_first, first), (ours_chunk, chunk), (ours_step, step)):
        assert _close(ours, theirs) and torch.equal(ours.argmax(-1), theirs.argmax(-1))
    real_rows = mask[:, :8].bool()  # padding positions' states are never read
    assert all(_close(ours_hidden[i][real_rows], hidden[i][real_rows]) for i in (1, 2))
    mixture.state.set_mode("linear")
    assert not native_prefill(lean, ids, mask, mixture.state)  # merged: one set of factors a row, transformers'
    mixture.state.set_mode("exact")
