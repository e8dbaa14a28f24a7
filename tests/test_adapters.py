"""Bad experts get a clear error that names the problem and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from loramix.adapters import load_expert
from loramix.errors import LoramixError
from loramix.mixture import attach_experts
from loramix.models import load_base_model


@pytest.fixture
def expert_copy(tiny_experts, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_experts[0], target)
    return target


def test_a_good_expert_loads_with_its_metadata(tiny_experts):
    expert = load_expert(tiny_experts[0])
    assert expert.rank == 4 and expert.scaling == 2.0
    assert expert.task == "gsm8k"
    assert len(expert.modules) == 4  # q_proj and v_proj in 2 layers
    assert all(name.startswith("model.layers.") for name in expert.modules)


def test_missing_folder(tmp_path):
    with pytest.raises(LoramixError, match="does not exist"):
        load_expert(tmp_path / "nowhere", "ghost")


def test_missing_config(expert_copy):
    (expert_copy / "adapter_config.json").unlink()
    with pytest.raises(LoramixError, match="adapter_config.json is missing"):
        load_expert(expert_copy)


def test_corrupt_config(expert_copy):
    (expert_copy / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoramixError, match="not valid JSON"):
        load_expert(expert_copy)


def test_missing_weights(expert_copy):
    (expert_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(LoramixError, match="adapter_model.safetensors is missing"):
        load_expert(expert_copy)


def test_truncated_weights(expert_copy):
    weights = expert_copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(LoramixError, match="corrupt or truncated"):
        load_expert(expert_copy)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"r": 0}, "no valid 'r'"),
    ],
)
def test_unsupported_adapter_features(expert_copy, change, message):
    config_file = expert_copy / "adapter_config.json"
    config = json.loads(config_file.read_text()) | change
    config_file.write_text(json.dumps(config))
    with pytest.raises(LoramixError, match=message):
        load_expert(expert_copy)


def test_rank_that_disagrees_with_the_matrices(expert_copy):
    config_file = expert_copy / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"r": 8}))
    with pytest.raises(LoramixError, match="do not match rank r=8"):
        load_expert(expert_copy)


def test_expert_of_another_shape_of_model_is_refused(tiny_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import make_random_expert, make_tiny_base

    other = make_tiny_base(tmp_path / "other")
    config = LlamaConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(other)
    foreign = make_random_expert(other, tmp_path / "foreign", seed=1)
    model, _ = load_base_model(str(tiny_base))
    with pytest.raises(LoramixError, match="trained on another base model"):
        attach_experts(model, [load_expert(foreign)])
