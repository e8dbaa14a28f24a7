"""`loramix eval`: the comparison, item by item, written as it goes and resumable (what is compared, and each
result's key: `loramix.eval_configs`).

Every scored item is one JSON line in OUT/items.jsonl. Re-running skips items whose key is already there; a
half-written line is dropped and redone. Data-parallel runs (`torchrun` or `accelerate launch`) give each process
every N-th item and its own items.rankR.jsonl; the summary reads them all."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from loramix.bundle import Bundle, BundleFingerprint, resolve_bundle
from loramix.errors import LoramixError
from loramix.eval_configs import (
    CONFIGS_HELP,
    EVAL_ROUTE,
    SCORING_VERSION,
    EvalConfig,
    generation_budget,
    item_key,
    oracle_expert,
    parse_configs,
)
from loramix.generation import GenerationResult
from loramix.hardware import DTYPE_NAMES, Placement
from loramix.hub import HubData
from loramix.mixture import DEFAULT_MERGE
from loramix.options import option
from loramix.paths import data_dir
from loramix.sequences import DEFAULT_DECODE
from loramix.store import REQUIRED_FIELDS, ItemStore, parse_record
from loramix.tasks import TASK_GROUPS, Example, get_task, parse_tasks
from loramix.tasks.arc import choose_by_loglik

# ---- the results file ----


def load_records(folder: Path) -> list[dict]:
    records = list(ItemStore(folder).load().records.values())
    stale = sum(record.get("scoring", 1) < SCORING_VERSION for record in records)
    if stale:
        raise LoramixError(
            f"{stale} of the {len(records)} items in {folder} were scored by older metrics (scoring version < "
            f"{SCORING_VERSION}); re-score them from their stored predictions: loramix eval --out {folder} --rescore"
        )
    return records


def rescore(folder: Path, data: Path | None, split: str = "test") -> list[dict]:
    """Score every stored prediction again with today's metrics (no generation), rewriting the item files in
    place; the log-likelihood choice (ARC) is kept. Returns per (config, task) how the primary metric moved."""
    examples: dict[str, dict[str, Example]] = {}
    changes: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(folder).glob("items*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        out = []
        for line in lines:
            record = parse_record(line, REQUIRED_FIELDS)
            if record is None:
                continue  # a half-written line: dropped, redone by the next run
            task = record["task"]
            if task not in examples:
                examples[task] = {e.id: e for e in get_task(task).load(data_dir(data), split)}
            example = examples[task].get(record["id"])
            if example is None:
                raise LoramixError(
                    f"Item {record['id']} is not in {task}'s {split} split; pass the split it came from."
                )
            old = record["scores"]
            new = get_task(task).score(record["prediction"], example)
            if "loglik_accuracy" in old:
                new["loglik_accuracy"] = old["loglik_accuracy"]
            metric = get_task(task).primary_metric
            cell = changes.setdefault((record["config"], task), {"n": 0, "changed": 0, "old": 0.0, "new": 0.0})
            cell["n"] += 1
            cell["changed"] += int(old.get(metric) != new[metric])
            cell["old"] += old.get(metric, 0.0)
            cell["new"] += new[metric]
            record["scores"], record["scoring"] = new, SCORING_VERSION
            out.append(json.dumps(record, ensure_ascii=False))
        staging = path.with_suffix(".tmp")
        staging.write_text("".join(line + "\n" for line in out), encoding="utf-8")
        os.replace(staging, path)  # atomic: a kill leaves the old file or the new one
    return [
        {"config": config, "task": task, "n": c["n"], "changed": c["changed"],
         "old_mean": c["old"] / c["n"], "new_mean": c["new"] / c["n"]}
        for (config, task), c in changes.items()
    ]  # fmt: skip


# ---- running ----


@dataclass(frozen=True)
class EvalPlan(Placement):
    """What `loramix eval` runs; the command's flags, defaults and help come from here."""

    out: Path = option(None, "Folder for items.jsonl, results.json/.md and plots.", required=True)
    bundle: Path | None = option(None, "Bundle folder (default: the trained default bundle).")
    tasks: tuple[str, ...] = option(
        TASK_GROUPS["trained"], "Comma-separated tasks or groups: trained, bbh, held-out (bbh + humaneval).",
        comma=True,
    )  # fmt: skip
    configs: str = option("paper", CONFIGS_HELP)
    limit: int | None = option(None, "First N items per task (default: all).")
    batch_size: int = option(8, "Prompts decoded together.")
    split: str = option("test", "Split to evaluate on.")
    data: Path | None = option(None, "Task data folder, or hub (default: $LORAMIX_DATA, else ../shared/data).",
                               flag="--data-dir")  # fmt: skip
    decode: str = option(DEFAULT_DECODE, "Default decode mode for tla configs.")
    merge: str = option(DEFAULT_MERGE, "Default merge mode for configs that do not set one.")
    route: str = option(EVAL_ROUTE, "Default routing rule of tla and prompt configs (the paper's rule).")
    max_new_tokens: int | None = option(None, "Cap every task's generation budget (smoke runs).")
    embedder_dtype: str = option("auto", "Router embedder precision: fp32, bf16 or auto.")
    generation: bool = option(True, "Generate and score by each task's metric.")
    loss: bool = option(False, "Also score every config by its gold answer's loss (routing as in generation).")

    def task_names(self) -> tuple[str, ...]:
        return parse_tasks(",".join(self.tasks))


def letter_token_ids(tokenizer, letters: tuple[str, ...]) -> tuple[int, ...]:
    """Token ids of ' A' ... ' E' (a task's answer letters) for log-likelihood; () if the tokenizer splits any of
    them (then the report has no loglik_accuracy: scoring multi-token letters would need more forward passes)."""
    ids = [tokenizer(" " + letter, add_special_tokens=False).input_ids for letter in letters]
    return tuple(pieces[0] for pieces in ids) if all(len(pieces) == 1 for pieces in ids) else ()


def _record(
    config: EvalConfig, key: str, task: str, example: Example, result: GenerationResult, seconds: float
) -> dict:
    spec = get_task(task)
    scores = spec.score(result.text, example)
    record = {
        "key": key,
        "config": config.name,
        "task": task,
        "id": example.id,
        "prediction": result.text,
        "scores": scores,
        "scoring": SCORING_VERSION,
        "tokens": len(result.token_ids),
        "seconds": round(seconds, 4),
        "finish": result.finish_reason,
    }
    if result.weights.numel():
        record["weights_mean"] = [round(w, 5) for w in result.weights.mean(dim=0).tolist()]
        record["reroutes"] = len(result.reroutes)
        record["frozen_reroutes"] = result.frozen_reroutes
    if spec.answer_letters and result.first_token_logprobs is not None:
        choice = choose_by_loglik(result.first_token_logprobs, example.choices, spec.answer_letters)
        record["loglik_choice"] = choice
        scores["loglik_accuracy"] = float(choice == example.references[0])
    return record


class _Engines:
    """Loads the mixture model (and the Arrow baseline) once, on first use."""

    def __init__(self, bundle: Bundle, cap: int | None, embedder_dtype: str, placement: tuple):
        self.bundle = bundle
        self.cap = cap
        self.embedder_dtype = embedder_dtype
        self.device, self.dtype = placement
        self._mixture = None
        self._arrow = None

    @property
    def mixture(self):
        if self._mixture is None:
            from loramix.generation import MixtureModel

            self._mixture = MixtureModel.from_bundle(
                self.bundle.root, embedder_dtype=self.embedder_dtype, device=self.device, dtype=self.dtype
            )
        return self._mixture

    @property
    def arrow(self):
        if self._arrow is None:
            from loramix.baselines import ArrowBaseline

            self._arrow = ArrowBaseline(self.bundle, device=self.device, dtype=self.dtype)
        return self._arrow

    def generate(self, config: EvalConfig, task: str, prompts: list[str], candidates: tuple[int, ...]):
        spec = get_task(task)
        budget = generation_budget(task, self.cap)
        if config.kind == "arrow":
            return self.arrow.generate(prompts, budget, spec.stop, candidates)
        mixture = self.mixture
        mixture.set_merge(config.merge)
        return mixture.generate(
            prompts,
            every_k=config.every_k,
            route=config.route_for(task, self.bundle),
            decode=config.decode,
            max_new_tokens=budget,
            stop=spec.stop,
            first_token_candidates=candidates,
        )


def resolve_embedder_dtype(dtype: str, device: str = "cpu") -> str:
    """The routing precision "auto" stands for on `device` (the one rule: `router.bf16_routing_pays`)."""
    from loramix.router import bf16_routing_pays

    return dtype if dtype != "auto" else ("bf16" if bf16_routing_pays(device) else "fp32")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_evaluation(plan: EvalPlan, progress: bool = True, on_batch=None) -> ItemStore:
    """Score every pending (config, task, item); returns the store with everything scored so far."""
    bundle = Bundle.load(resolve_bundle(plan.bundle))
    defaults = EvalConfig.defaults(plan.decode, plan.merge, plan.route)
    configs = parse_configs(plan.configs, bundle, defaults)
    tasks = plan.task_names()
    placement = Placement(plan.device, plan.dtype).resolve()
    routing_dtype = resolve_embedder_dtype(plan.embedder_dtype, placement[0])
    fingerprint = BundleFingerprint.of(bundle, routing_dtype)
    rank, world = distributed_rank()
    store = ItemStore(plan.out, rank=rank).load()
    root = data_dir(plan.data)
    examples = {task: get_task(task).load(root, plan.split)[: plan.limit] for task in tasks}
    model_dtype = DTYPE_NAMES[placement[1]]
    engines = _Engines(bundle, plan.max_new_tokens, routing_dtype, placement)
    stored_keys = store.keys_by_cell()
    plan_of_work = []  # every check runs before any generation, so a refusal wastes no time
    for config in configs:
        work = []
        for task in tasks:
            if config.kind == "oracle":
                oracle_expert(bundle, task)  # fail early with a clear message
            hub_data = get_task(task).data_name(root) if isinstance(root, HubData) else None
            key = item_key(config, task, bundle, fingerprint, plan.split, plan.max_new_tokens, hub_data, model_dtype)
            _refuse_mixed_settings(store.folder, stored_keys[(config.name, task)], config.name, task, key)
            work += [(task, key, e) for e in examples[task][rank::world]]
        plan_of_work.append((config, work))
    for config, work in plan_of_work:
        # filtered only now: configs can share a key (expert:E on E's task is the oracle), scored once
        work = [(task, key, e) for task, key, e in work if not store.has(key, e.id)]
        if work:
            # what each record names besides its scores: where its data came from, the model's precision
            named = {task: {"data": get_task(task).data_name(root), "dtype": model_dtype} for task in tasks}
            _run_config(config, work, engines, store, plan.batch_size, progress, on_batch, named)
    return store


def _refuse_mixed_settings(folder: Path, stored: set[str], config: str, task: str, key: str) -> None:
    """The report shows one result per config, task and item: results of other settings would mix into it."""
    if stored - {key}:
        raise LoramixError(
            f"{folder} already holds '{config}' results on {task} from a run with other settings (another "
            "bundle, split, data origin, --max-new-tokens or scoring version), and one report cannot mix them. "
            f"Write this run to another --out, or move the items*.jsonl files in {folder} away to start over."
        )


def _run_config(config, work, engines, store, batch_size, progress, on_batch, named) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn(f"[bold]{config.name:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        handle = bar.add_task(config.name, total=len(work))
        for task in dict.fromkeys(task for task, _, _ in work):
            items = sorted(((k, e) for t, k, e in work if t == task), key=lambda pair: -len(pair[1].prompt))
            letters = get_task(task).answer_letters
            candidates = letter_token_ids(engines.mixture.tokenizer, letters) if letters else ()
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                began = time.perf_counter()
                results = engines.generate(config, task, [e.prompt for _, e in batch], candidates)
                seconds = (time.perf_counter() - began) / len(batch)
                store.append(
                    _record(config, key, task, e, r, seconds) | named[task] for (key, e), r in zip(batch, results)
                )
                bar.advance(handle, len(batch))
                if on_batch is not None:
                    on_batch(config, task, len(batch))
