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
from loramix.options import option
from loramix.paths import data_dir
from loramix.store import ItemStore
from loramix.tasks import TASK_GROUPS, Example, get_task, parse_tasks

LOSS_STEM = "answer_loss"
LOSS_FIELDS = ("key", "model", "task", "id", "nll", "tokens")
MAX_ANSWER_TOKENS = 256  # longer gold answers (a few CodeAlpaca ones) are scored on their first 256 tokens


@dataclass(frozen=True)
class SpecialistPlan(Placement):
    """What `loramix specialist` runs; its flags come from here."""

    out: Path = option(None, "Folder for answer_loss.jsonl (and the report, results.md).", required=True)
    bundle: Path | None = option(None, "Bundle folder (default: the trained default bundle).")
    tasks: tuple[str, ...] = option(TASK_GROUPS["trained"], "Comma-separated tasks or groups.", comma=True)
    limit: int | None = option(None, "First N items per task (default: all).")
    batch_size: int = option(8, "Items scored together.")
    split: str = option("test", "Split to score.")
    data: Path | None = option(None, "Task data folder (default: $LORAMIX_DATA, else ../shared/data).",
                               flag="--data-dir")  # fmt: skip

    def task_names(self) -> tuple[str, ...]:
        return parse_tasks(",".join(self.tasks))


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
    mixture.set_weights(None if weights is None else weights.expand(len(examples), -1))
    return teacher_forced_losses(mixture.model, mixture.tokenizer, mixture.pad_id, examples)


def teacher_forced_losses(model, tokenizer, pad_id: int, examples: list[Example]) -> list[tuple[float, int]]:
    """One left-padded forward pass of prompt + gold answer through `model` as it is; the answers' mean NLL."""
    encoded = [encode(tokenizer, e) for e in examples]
    keep = max(n for _, n in encoded) + 1  # left padding puts every answer at the end: keep only those logits
    input_ids, mask = left_pad([ids for ids, _ in encoded], pad_id)
    length = input_ids.shape[1]
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = (
            model(
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


def routed_answer_losses(mixture, examples: list[Example], options) -> list[tuple[float, int]]:
    """(mean answer NLL, answer tokens) per example with routing recomputed at every gold token exactly as
    generation would (`options`: route, every_k, decode, merge): the engine emits the gold tokens instead of
    choosing them, batched like generation."""
    from dataclasses import replace

    from loramix.generation import GenerationStream

    tokenizer = mixture.tokenizer
    answers = [tokenizer(e.answer_text, add_special_tokens=False).input_ids[:MAX_ANSWER_TOKENS] or [mixture.eos_ids[0]]
               for e in examples]  # fmt: skip
    forced = [
        replace(options, forced=tuple(ids), max_new_tokens=len(ids), min_new_tokens=0, logprobs=0, stop=())
        for ids in answers
    ]
    stream = GenerationStream(mixture, [e.prompt for e in examples], options, per_prompt=forced)
    for _ in stream:
        pass
    return [(-sum(seq.token_logprobs) / len(seq.token_logprobs), len(seq.token_logprobs)) for seq in stream.sequences]


def run_specialist(plan: SpecialistPlan, progress: bool = True) -> ItemStore:
    """Score every pending (model, task, item) of the matrix; returns the store with everything so far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bundle = Bundle.load(resolve_bundle(plan.bundle))
    tasks = plan.task_names()
    fingerprint = BundleFingerprint.of(bundle)
    store = loss_store(plan.out).load()
    root = data_dir(plan.data)
    names = [e.name for e in bundle.experts]
    models = ["base", *names]
    device, dtype = plan.resolve()
    work = []
    for task in tasks:
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


# ---- the gold-answer loss of any eval config (loramix eval --loss) ----


def config_model_name(config) -> str:
    """The loss rows' name of an eval config: the specialist's names where they coincide (base, each expert), so
    those losses are computed once for both commands."""
    if config.kind == "expert":
        return config.expert
    return config.name


def run_answer_losses(plan, progress: bool = True) -> ItemStore:
    """Gold-answer loss of every config of an eval plan on every item (`loramix eval --loss`): fixed weights in
    one teacher-forced pass, routed configs through the engine with the gold tokens forced (routing recomputed
    as generation would), PEFT's Arrow in one pass (its routing is per token already). Resumable."""
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from loramix.eval_configs import EvalConfig, item_key, parse_configs
    from loramix.evaluation import _Engines, resolve_embedder_dtype
    from loramix.sequences import GenerationOptions

    bundle = Bundle.load(resolve_bundle(plan.bundle))
    defaults = EvalConfig.defaults(plan.decode, plan.merge, plan.route)
    configs = [c for c in parse_configs(plan.configs, bundle, defaults) if c.kind != "oracle"]  # = its expert
    device, dtype = Placement(plan.device, plan.dtype).resolve()
    routing_dtype = resolve_embedder_dtype(plan.embedder_dtype, device)
    fingerprint = BundleFingerprint.of(bundle, routing_dtype)
    dtype_name = DTYPE_NAMES[dtype]
    store = loss_store(plan.out).load()
    root = data_dir(plan.data)
    names = bundle.expert_names
    work = []
    for task in plan.task_names():
        examples = get_task(task).load(root, plan.split)[: plan.limit]
        for config in configs:
            model = config_model_name(config)
            if config.kind in ("base", "expert"):
                key = loss_key(model, task, plan.split, fingerprint, dtype_name)
            else:
                generation = item_key(config, task, bundle, fingerprint, plan.split, None, None, dtype_name)
                key = hashlib.sha256(f"{generation}|loss|{MAX_ANSWER_TOKENS}".encode()).hexdigest()[:20]
            pending = sorted((e for e in examples if not store.has(key, e.id)), key=lambda e: len(e.training_text))
            size = plan.batch_size if config.kind in ("prompt", "tla") else 2 * plan.batch_size
            work += [(config, model, task, key, pending[i : i + size]) for i in range(0, len(pending), size)]
    if not work:
        return store
    engines = _Engines(bundle, None, routing_dtype, (device, dtype))
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        handle = bar.add_task("gold-answer loss", total=sum(len(batch) for *_, batch in work))
        for config, model, task, key, batch in work:
            bar.update(handle, description=f"gold-answer loss {config.name:<24}")
            mixture = engines.mixture
            if config.kind == "arrow":
                arrow = engines.arrow
                losses = teacher_forced_losses(arrow.model, arrow.tokenizer, mixture.pad_id, batch)
            elif config.kind in ("base", "expert", "uniform"):
                weights = {"base": None, "uniform": torch.full((1, len(names)), 1.0 / len(names))}.get(config.kind)
                if config.kind == "expert":
                    weights = torch.eye(len(names))[names.index(config.expert)].unsqueeze(0)
                mixture.set_merge(config.merge)
                mixture.state.set_mode(config.merge)
                losses = answer_losses(mixture, batch, weights)
            else:
                mixture.set_merge(config.merge)
                options = GenerationOptions(
                    every_k=config.every_k, route=config.route_for(task, bundle), decode=config.decode,
                    merge=config.merge,
                )  # fmt: skip
                losses = routed_answer_losses(mixture, batch, replace(options))
            store.append(
                {"key": key, "model": model, "task": task, "id": e.id, "nll": round(nll, 5), "tokens": n,
                 "dtype": dtype_name}
                for e, (nll, n) in zip(batch, losses)
            )  # fmt: skip
            bar.advance(handle, len(batch))
    return store
