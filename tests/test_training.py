"""Training an expert: a standard PEFT adapter, answer-only loss, resumable, refuses silent overwrites."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.errors import LoramixError
from loramix.models import load_base_model
from loramix.tasks import get_task
from loramix.training import TrainConfig, tokenize_example, train_expert


def _config(tiny_base, **changes):
    settings = dict(
        task="gsm8k", base_model=str(tiny_base), rank=4, max_examples=8, batch_size=2, max_steps=4, save_steps=2
    )
    return TrainConfig(**(settings | changes))


def test_loss_covers_the_answer_only(tiny_base, tiny_data):
    _, tokenizer = load_base_model(str(tiny_base))
    example = get_task("gsm8k").load(tiny_data, "train")[0]
    row = tokenize_example(tokenizer, example, 512)
    n_prompt = len(tokenizer(example.prompt).input_ids)
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_example(tokenizer, example, 10) is None


def test_trained_expert_is_a_standard_peft_adapter(tiny_base, tiny_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "expert"
    metadata = train_expert(_config(tiny_base), out, data=tiny_data, quiet=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "loramix_expert.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "checkpoints").exists()
    assert metadata["task"] == "gsm8k" and metadata["steps"] == 4 and metadata["examples"] == 8
    assert len(metadata["data_fingerprint"]) == 16 and metadata["train_seconds"] > 0
    model, tokenizer = load_base_model(str(tiny_base))
    ids = tokenizer(["Question: hi\n\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
        peft_model = PeftModel.from_pretrained(model, str(out))
        after = peft_model(**ids).logits
    assert (after - before).abs().max() > 0, "training moved the adapter away from its zero initialisation"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_interrupted_training_resumes_from_the_last_checkpoint(tiny_base, tiny_data, tmp_path, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "expert"
    original = Trainer.training_step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        train_expert(_config(tiny_base, max_steps=6), out, data=tiny_data, quiet=True)
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(Trainer, "training_step", original)
    metadata = train_expert(_config(tiny_base, max_steps=6), out, data=tiny_data, quiet=True)
    assert metadata["resumed_from"] == "checkpoint-2" and metadata["steps"] == 6


def test_resuming_with_other_settings_is_refused(tiny_base, tiny_data, tmp_path, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "expert"

    def stop_after_checkpoint(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", stop_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_expert(_config(tiny_base), out, data=tiny_data, quiet=True)
    monkeypatch.setattr(Trainer, "training_step", original)
    with pytest.raises(LoramixError, match="other settings"):
        train_expert(_config(tiny_base, learning_rate=1e-3), out, data=tiny_data, quiet=True)


def test_finished_expert_is_kept_unless_forced(tiny_base, tiny_data, tmp_path):
    out = tmp_path / "expert"
    first = train_expert(_config(tiny_base, max_steps=2), out, data=tiny_data, quiet=True)
    again = train_expert(_config(tiny_base, max_steps=2), out, data=tiny_data, quiet=True)
    assert again == first  # same settings: nothing retrained
    with pytest.raises(LoramixError, match="--force"):
        train_expert(_config(tiny_base, max_steps=3), out, data=tiny_data, quiet=True)
    forced = train_expert(_config(tiny_base, max_steps=3), out, data=tiny_data, force=True, quiet=True)
    assert forced["steps"] == 3


def test_invalid_settings(tiny_base, tiny_data, tmp_path):
    with pytest.raises(LoramixError, match="rank"):
        train_expert(_config(tiny_base, rank=0), tmp_path / "x", data=tiny_data)
