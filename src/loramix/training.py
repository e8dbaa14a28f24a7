"""Training one LoRA expert on one task with PEFT and the Hugging Face Trainer.

The loss covers the answer tokens only (prompt tokens are masked), and an end-of-sequence token closes
every answer so the expert learns to stop. Checkpoints are written as training goes; re-running the
same command resumes from the last one. The result is a standard PEFT adapter folder plus
loramix_expert.json (task, base model, data fingerprint, hyper-parameters, time taken).

Scaling out uses the Trainer's own engines: `torchrun --nproc-per-node N -m loramix train ...` or
`accelerate launch -m loramix train ...` run data-parallel with no change here.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loramix import __version__
from loramix.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_METADATA
from loramix.errors import LoramixError
from loramix.models import DEFAULT_BASE_MODEL, base_model_signature, load_base_model
from loramix.options import option
from loramix.paths import data_dir
from loramix.tasks import Example, get_task


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow the paper (q_proj/v_proj, lora_alpha 16, dropout 0.1) except where a CPU needs less:
    rank 16 instead of 64 (four experts stay small enough to ship), and a budget of examples and steps
    that trains an expert in minutes rather than hours."""

    task: str
    base_model: str = option(DEFAULT_BASE_MODEL, "Base model: an alias, a local folder or a HF id.", flag="--base")
    rank: int = option(16, "LoRA rank (paper: 64; 16 keeps CPU experts small).")
    lora_alpha: float = option(16.0, "lora_alpha (paper: 16).", flag="--alpha")
    dropout: float = option(0.1, "LoRA dropout (paper: 0.1).")
    target_modules: tuple[str, ...] = option(
        ("q_proj", "v_proj"), "Linear layers to adapt, comma-separated (paper: q_proj,v_proj; GPT-NeoX: "
        "query_key_value).", comma=True,
    )  # fmt: skip
    max_examples: int = option(1000, "Training examples, a seeded sample of the train split.")
    epochs: float = option(1.0, "Passes over the examples.")
    max_steps: int = option(-1, "Optimizer steps; overrides --epochs when positive.")
    batch_size: int = option(8, "Examples per step.")
    gradient_accumulation: int = option(1, "Steps whose gradients are summed before each update.")
    learning_rate: float = option(2e-4, "Learning rate.", flag="--lr")
    max_length: int = option(512, "Longest example in tokens; longer ones are skipped.")
    seed: int = option(0, "Seed of the example sample, the adapter's initialisation and the data order.")
    save_steps: int = option(20, "Checkpoint every N steps (re-running resumes).")
    # bf16 autocast: ~1.7x faster on a CPU with AVX512-BF16; adapter weights stay fp32
    bf16: bool = option(True, "bf16 autocast (faster; adapter weights stay fp32).")

    def validate(self) -> None:
        checks = {
            "rank": self.rank > 0,
            "max_examples": self.max_examples > 0,
            "batch_size": self.batch_size > 0,
            "learning_rate": self.learning_rate > 0,
            "max_length": self.max_length > 8,
            "epochs": self.epochs > 0 or self.max_steps > 0,
            "target_modules": len(self.target_modules) > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise LoramixError(f"Invalid training settings: {', '.join(bad)} must be positive (or non-empty).")


def select_examples(examples: list[Example], max_examples: int, seed: int) -> list[Example]:
    """A fixed, seeded sample of the training split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:max_examples]]


def data_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.training_text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def tokenize_example(tokenizer, example: Example, max_length: int) -> dict | None:
    """input_ids and labels with the prompt masked (-100); None when the example is too long."""
    prompt_ids = tokenizer(example.prompt).input_ids
    answer_ids = tokenizer(example.answer_text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(answer_ids) > max_length:
        return None
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


class _PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def is_trained(out: Path) -> bool:
    return all((out / name).is_file() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_METADATA))


def _last_checkpoint(folder: Path) -> Path | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def _config_record(config: TrainConfig) -> dict:
    """The settings that shape the result (how often checkpoints are written does not)."""
    record = asdict(config) | {"target_modules": list(config.target_modules)}
    record.pop("save_steps")
    return record


def _guard_resume(checkpoints: Path, config: TrainConfig, force: bool) -> Path | None:
    """The checkpoint to resume from, refusing to resume one written with other settings."""
    record = checkpoints / "loramix_train_config.json"
    if force and checkpoints.exists():
        shutil.rmtree(checkpoints)
    resume = _last_checkpoint(checkpoints)
    if resume is not None and record.is_file():
        recorded = json.loads(record.read_text(encoding="utf-8"))
        recorded.pop("save_steps", None)  # written by older versions
        if recorded != _config_record(config):
            raise LoramixError(
                f"{checkpoints} holds a run with other settings; re-run with the same settings to resume it, "
                "or pass --force to start over."
            )
    checkpoints.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(_config_record(config), indent=2), encoding="utf-8")
    return resume


def check_target_modules(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Refuse target modules this base model has no Linear layers for, naming the ones it has."""
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in linear_names]
    if missing:
        choices = ", ".join(sorted(linear_names - {"lm_head"}))
        raise LoramixError(
            f"This base model ({model.config.model_type}) has no Linear layers named {', '.join(missing)}. "
            f"Choose --target-modules among: {choices}."
        )


def train_expert(
    config: TrainConfig, out: str | Path, data: str | Path | None = None, force: bool = False, quiet: bool = False
) -> dict:
    """Train (or resume training) one expert into `out`. Returns its metadata."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    config.validate()
    out = Path(out)
    if is_trained(out) and not force:
        metadata = json.loads((out / EXPERT_METADATA).read_text(encoding="utf-8"))
        recorded = dict(metadata.get("config", {}))
        recorded.pop("save_steps", None)
        if recorded == _config_record(config):
            return metadata
        raise LoramixError(f"{out} already holds an expert trained with other settings; pass --force to retrain it.")

    task = get_task(config.task)
    examples = select_examples(task.load(data_dir(data), "train"), config.max_examples, config.seed)
    model, tokenizer = load_base_model(config.base_model)
    signature = base_model_signature(model)
    check_target_modules(model, config.target_modules)
    rows = [tokenize_example(tokenizer, e, config.max_length) for e in examples]
    kept = [e for e, r in zip(examples, rows) if r is not None]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise LoramixError(f"Every example is longer than --max-length {config.max_length}; raise it.")

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora)
    checkpoints = out / "checkpoints"
    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=10,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        report_to=[],
        seed=config.seed,
        remove_unused_columns=False,
        disable_tqdm=quiet,
        use_cpu=not torch.cuda.is_available(),
        bf16=config.bf16,
    )
    trainer = Trainer(
        model=peft_model, args=arguments, train_dataset=rows, data_collator=_PadCollator(tokenizer.pad_token_id)
    )
    resume = _guard_resume(checkpoints, config, force)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start

    peft_model.save_pretrained(out)
    metadata = {
        "task": config.task,
        "base_model": config.base_model,
        "base_model_signature": signature,
        "data_fingerprint": data_fingerprint(kept),
        "examples": len(kept),
        "skipped_too_long": len(examples) - len(kept),
        "steps": result.global_step,
        "train_loss": round(float(result.training_loss), 4),
        "train_seconds": round(seconds, 1),
        "resumed_from": resume.name if resume else None,
        "config": _config_record(config),
        "loramix_version": __version__,
    }
    (out / EXPERT_METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is complete; checkpoints only served resuming
    return metadata
