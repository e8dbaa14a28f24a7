"""`loramix specialist`: the specialist matrix by teacher forcing.

For every task's test items, the mean loss (nats per token) of the gold answer under the base model and under
each expert alone. It shows what each expert learned even where the task metric sits at the floor: at 135M
parameters no model gets GSM8K's final numbers right, yet its expert predicts the gold solutions far better.

The answer is scored exactly as it was trained: prompt, then " " + target; the end-of-text token is left out.
Items are stored one JSON line each in OUT/answer_loss.jsonl (resumable, like items.jsonl).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.bundle import Bundle, BundleFingerprint, resolve_bundle
from loramix.engine import left_pad, left_padded_positions
from loramix.generation import MixtureModel
from loramix.hardware import DTYPE_NAMES, Placement
from loramix.paths import data_dir
from loramix.store import ItemStore
from loramix.tasks import Example, get_task

LOSS_STEM = "answer_loss"
LOSS_FIELDS = ("key", "model", "task", "id", "nll", "tokens")
MAX_ANSWER_TOKENS = 256  # longer gold answers (a few CodeAlpaca ones) are scored on their first 256 tokens


@dataclass(frozen=True)
class SpecialistPlan:
    bundle: Path | None
    tasks: tuple[str, ...]
    out: Path
    limit: int | None = None
    batch_size: int = 8
    split: str = "test"
    data: Path | None = None
    placement: Placement = Placement(device="cpu", dtype="fp32")  # the stored losses are fp32 on a CPU


def loss_store(out: Path) -> ItemStore:
    return ItemStore(out, stem=LOSS_STEM, required=LOSS_FIELDS)


def loss_key(model: str, task: str, split: str, fingerprint: BundleFingerprint, dtype: str = "fp32") -> str:
    """What an item's loss depends on: the base model, the expert (if any), the task's split, the scoring, and the
    precision when it is not fp32."""
    parts = {"model": model, "task": task, "split": split, "base": fingerprint.base, "max": MAX_ANSWER_TOKENS}
    if dtype != "fp32":
        parts["dtype"] = dtype
    if model != "base":
        parts["expert"] = fingerprint.experts[model]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def encode(tokenizer, example: Example) -> tuple[list[int], int]:
    """Token ids of prompt + answer, and how many of them are the answer (as in training, without EOS)."""
    prompt_ids = tokenizer(example.prompt).input_ids
    answer_ids = tokenizer(example.answer_text, add_special_tokens=False).input_ids[:MAX_ANSWER_TOKENS]
    return prompt_ids + answer_ids, len(answer_ids)


def answer_losses(mixture, examples: list[Example], weights: torch.Tensor | None) -> list[tuple[float, int]]:
    """(mean answer NLL in nats/token, answer tokens) per example, all in one left-padded forward pass.

    weights: [n_experts] fixed mixing weights (one-hot = one expert), or None for the base model.
    """
    encoded = [encode(mixture.tokenizer, e) for e in examples]
    keep = max(n for _, n in encoded) + 1  # left padding puts every answer at the end: keep only those logits
    input_ids, mask = left_pad([ids for ids, _ in encoded], mixture.pad_id)
    length = input_ids.shape[1]
    mixture.set_weights(None if weights is None else weights.expand(len(encoded), -1))
    device = mixture.device
    with torch.no_grad():
        logits = (
            mixture.model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=left_padded_positions(mask).to(device),
                use_cache=False,
                logits_to_keep=keep,
            )
            .logits[:, :-1]
            .float()
        )
    targets = input_ids[:, length - keep + 1 :].to(device)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    answer_lengths = torch.tensor([n for _, n in encoded], device=device)
    is_answer = torch.arange(keep - 1, device=device).unsqueeze(0) >= (keep - 1 - answer_lengths).unsqueeze(1)
    totals = (nll * is_answer).sum(dim=1)
    return [(float(total) / max(n, 1), n) for total, n in zip(totals.tolist(), answer_lengths.tolist())]


def run_specialist(plan: SpecialistPlan, progress: bool = True) -> ItemStore:
    """Score every pending (model, task, item) of the matrix; returns the store with everything so far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bundle = Bundle.load(resolve_bundle(plan.bundle))
    for task in plan.tasks:
        get_task(task)
    fingerprint = BundleFingerprint.of(bundle)
    store = loss_store(plan.out).load()
    root = data_dir(plan.data)
    names = [e.name for e in bundle.experts]
    models = ["base", *names]
    device, dtype = plan.placement.resolve()
    work = []
    for task in plan.tasks:
        examples = get_task(task).load(root, plan.split)[: plan.limit]
        for model in models:
            key = loss_key(model, task, plan.split, fingerprint, DTYPE_NAMES[dtype])
            # similar lengths share a batch, so little of it is padding
            pending = sorted((e for e in examples if not store.has(key, e.id)), key=lambda e: len(e.training_text))
            work += [
                (model, task, key, pending[i : i + plan.batch_size]) for i in range(0, len(pending), plan.batch_size)
            ]
    if not work:
        return store
    mixture = MixtureModel.from_bundle(bundle.root, with_router=False, device=device, dtype=dtype)
    columns = [TextColumn("[bold]answer loss"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        handle = bar.add_task("answer loss", total=sum(len(batch) for *_, batch in work))
        for model, task, key, batch in work:
            weights = None if model == "base" else torch.eye(len(names))[names.index(model)].unsqueeze(0)
            losses = answer_losses(mixture, batch, weights)
            store.append(
                {"key": key, "model": model, "task": task, "id": e.id, "nll": round(nll, 5), "tokens": n}
                for e, (nll, n) in zip(batch, losses)
            )
            bar.advance(handle, len(batch))
    return store
