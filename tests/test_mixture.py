"""Every merge mode equals PEFT itself (or, for `paper`, the PEFT 0.4.0 formula written out) to 1e-4."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from loramix.adapters import load_expert
from loramix.errors import LoramixError
from loramix.mixture import attach_experts, detach_experts
from loramix.models import load_base_model

PROMPTS = ["Question: What is 2 + 3?\n\nAnswer:", "Context:\nThe sky is blue.\n\nQuestion: What colour"]
TOLERANCE = 1e-4


def _batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _ours(tiny_base, expert_paths, weights, mode):
    model, tokenizer = load_base_model(str(tiny_base))
    experts = [load_expert(p) for p in expert_paths]
    state = attach_experts(model, experts, mode)
    state.set_weights(torch.tensor(weights), torch.float32, torch.device("cpu"))
    batch = _batch(tokenizer)
    with torch.no_grad():
        return model(**batch).logits


def _peft(tiny_base, expert_paths):
    model, tokenizer = load_base_model(str(tiny_base))
    peft_model = PeftModel.from_pretrained(model, str(expert_paths[0]), adapter_name=expert_paths[0].name)
    for path in expert_paths[1:]:
        peft_model.load_adapter(str(path), adapter_name=path.name)
    return peft_model, _batch(tokenizer)


def _peft_weighted(tiny_base, expert_paths, weights, combination):
    peft_model, batch = _peft(tiny_base, expert_paths)
    peft_model.add_weighted_adapter([p.name for p in expert_paths], weights, "mix", combination_type=combination)
    peft_model.set_adapter("mix")
    with torch.no_grad():
        return peft_model(**batch).logits


def _base_logits(tiny_base):
    model, tokenizer = load_base_model(str(tiny_base))
    with torch.no_grad():
        return model(**_batch(tokenizer)).logits


@pytest.mark.parametrize("mode", ["exact", "linear"])
@pytest.mark.parametrize("expert", [0, 1, 2])
def test_one_hot_weights_equal_that_single_peft_adapter(tiny_base, tiny_experts, mode, expert):
    one_hot = [1.0 if i == expert else 0.0 for i in range(3)]
    ours = _ours(tiny_base, tiny_experts, [one_hot, one_hot], mode)
    peft_model, batch = _peft(tiny_base, tiny_experts)
    peft_model.set_adapter(tiny_experts[expert].name)
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    assert (ours - theirs).abs().max() < TOLERANCE
    assert (theirs - _base_logits(tiny_base)).abs().max() > 1e-2, "the adapter must actually change the logits"


def test_exact_equals_peft_cat(tiny_base, tiny_experts):
    weights = [0.5, 0.3, 0.2]
    ours = _ours(tiny_base, tiny_experts, [weights, weights], "exact")
    theirs = _peft_weighted(tiny_base, tiny_experts, weights, "cat")
    assert (ours - theirs).abs().max() < TOLERANCE


def test_linear_equals_peft_linear(tiny_base, tiny_experts):
    weights = [0.6, 0.1, 0.3]
    ours = _ours(tiny_base, tiny_experts, [weights, weights], "linear")
    theirs = _peft_weighted(tiny_base, tiny_experts, weights, "linear")
    assert (ours - theirs).abs().max() < TOLERANCE
    # linear has cross terms B_i A_j, so it is not the exact mixture
    assert (ours - _ours(tiny_base, tiny_experts, [weights, weights], "exact")).abs().max() > 1e-3


def _peft_040_formula(tiny_base, tiny_experts, weights):
    """PEFT 0.4.0 add_weighted_adapter: A' = sum_i w_i s_i A_i, B' = sum_i B_i, scaling 1."""
    peft_model, batch = _peft(tiny_base, tiny_experts)
    names = [p.name for p in tiny_experts]
    peft_model.add_weighted_adapter(names, weights, "mix", combination_type="linear")  # creates the slots
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            module.lora_A["mix"].weight.data = sum(
                w * module.scaling[n] * module.lora_A[n].weight.data for n, w in zip(names, weights)
            )
            module.lora_B["mix"].weight.data = sum(module.lora_B[n].weight.data for n in names)
            assert module.scaling["mix"] == 1.0
    peft_model.set_adapter("mix")
    with torch.no_grad():
        return peft_model(**batch).logits


@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]])
def test_paper_equals_peft_040_formula(tiny_base, tiny_experts, weights):
    ours = _ours(tiny_base, tiny_experts, [weights, weights], "paper")
    theirs = _peft_040_formula(tiny_base, tiny_experts, weights)
    assert (ours - theirs).abs().max() < TOLERANCE


def test_paper_mode_with_one_hot_weights_is_not_the_single_adapter(tiny_base, tiny_experts):
    """The trap in the reference code: B matrices are summed unweighted, so even a one-hot routing
    applies (sum_j B_j) s_i A_i, cross terms included."""
    one_hot = [0.0, 1.0, 0.0]
    paper = _ours(tiny_base, tiny_experts, [one_hot, one_hot], "paper")
    single = _ours(tiny_base, tiny_experts, [one_hot, one_hot], "exact")
    assert (paper - single).abs().max() > 1e-3


@pytest.mark.parametrize("mode,combination", [("exact", "cat"), ("linear", "linear")])
def test_per_sequence_weights_in_one_batch(tiny_base, tiny_experts, mode, combination):
    rows = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    ours = _ours(tiny_base, tiny_experts, rows, mode)
    for i, weights in enumerate(rows):
        theirs = _peft_weighted(tiny_base, tiny_experts, weights, combination)
        assert (ours[i] - theirs[i]).abs().max() < TOLERANCE


def test_experts_of_different_ranks_mix_exactly_and_are_refused_by_merged_modes(tiny_base, tiny_experts, tmp_path):
    from helpers import make_random_expert

    wide = make_random_expert(tiny_base, tmp_path / "wide", seed=7, rank=8, alpha=4.0)
    paths = [tiny_experts[0], wide]
    weights = [0.4, 0.6]
    ours = _ours(tiny_base, paths, [weights, weights], "exact")
    theirs = _peft_weighted(tiny_base, paths, weights, "cat")
    assert (ours - theirs).abs().max() < TOLERANCE
    model, _ = load_base_model(str(tiny_base))
    for mode in ("linear", "paper"):
        with pytest.raises(LoramixError, match="equal rank"):
            attach_experts(model, [load_expert(p) for p in paths], mode)


def test_expert_on_a_subset_of_modules_contributes_nothing_elsewhere(tiny_base, tiny_experts, tmp_path):
    from helpers import make_random_expert

    q_only = make_random_expert(tiny_base, tmp_path / "q_only", seed=9, targets=("q_proj",))
    paths = [tiny_experts[0], q_only]
    weights = [0.5, 0.5]
    ours = _ours(tiny_base, paths, [weights, weights], "exact")
    theirs = _peft_weighted(tiny_base, paths, weights, "cat")
    assert (ours - theirs).abs().max() < TOLERANCE


def test_an_rslora_expert_of_another_rank_alpha_and_targets_mixes_exactly(tiny_base, tiny_experts, tmp_path):
    """rsLoRA scales by alpha / sqrt(r), not alpha / r: one-hot on it is PEFT's own adapter, and a mix with a plain
    expert of another rank, alpha and target set is PEFT's weighted sum (cat) of the two."""
    from helpers import make_random_expert

    rs = make_random_expert(tiny_base, tmp_path / "rs", seed=11, rank=8, alpha=3.0, targets=("q_proj", "o_proj"),
                            use_rslora=True)  # fmt: skip
    assert load_expert(rs).scaling == pytest.approx(3.0 / 8**0.5)
    paths = [tiny_experts[0], rs]
    ours = _ours(tiny_base, paths, [[0.0, 1.0], [0.0, 1.0]], "exact")
    peft_model, batch = _peft(tiny_base, paths)
    peft_model.set_adapter("rs")
    with torch.no_grad():
        assert (ours - peft_model(**batch).logits).abs().max() < TOLERANCE
    ours = _ours(tiny_base, paths, [[0.3, 0.7], [0.3, 0.7]], "exact")
    assert (ours - _peft_weighted(tiny_base, paths, [0.3, 0.7], "cat")).abs().max() < TOLERANCE


def test_detach_restores_the_base_model(tiny_base, tiny_experts):
    model, tokenizer = load_base_model(str(tiny_base))
    state = attach_experts(model, [load_expert(p) for p in tiny_experts])
    state.set_weights(torch.tensor([[0.3, 0.3, 0.4]] * 2), torch.float32, torch.device("cpu"))
    detach_experts(model)
    with torch.no_grad():
        assert torch.equal(model(**_batch(tokenizer)).logits, _base_logits(tiny_base))


def test_experts_off_is_exactly_the_base_model(tiny_base, tiny_experts):
    model, tokenizer = load_base_model(str(tiny_base))
    state = attach_experts(model, [load_expert(p) for p in tiny_experts])
    state.set_weights(None, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(**_batch(tokenizer)).logits, _base_logits(tiny_base))


def test_fp16_stored_expert_is_upcast_and_stays_equivalent(tiny_base, tiny_experts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    half = tmp_path / "fp16_expert"
    shutil.copytree(tiny_experts[1], half)
    tensors = load_file(str(half / "adapter_model.safetensors"))
    save_file({k: v.half() for k, v in tensors.items()}, str(half / "adapter_model.safetensors"))
    expert = load_expert(half)
    assert all(pair.A.dtype == torch.float32 for pair in expert.modules.values())
    ours = _ours(tiny_base, [half], [[1.0], [1.0]], "exact")
    peft_model, batch = _peft(tiny_base, [half])
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    assert (ours - theirs).abs().max() < TOLERANCE


def test_changing_the_merge_mode_after_setting_weights_recomputes_the_coefficients(tiny_base, tiny_experts):
    weights = [[0.6, 0.1, 0.3], [0.6, 0.1, 0.3]]
    linear = _ours(tiny_base, tiny_experts, weights, "linear")
    model, tokenizer = load_base_model(str(tiny_base))
    state = attach_experts(model, [load_expert(p) for p in tiny_experts], "exact")
    state.set_weights(torch.tensor(weights), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(**_batch(tokenizer))  # builds nothing for exact; then switch
        state.set_mode("linear")
        assert (model(**_batch(tokenizer)).logits - linear).abs().max() < TOLERANCE
