"""`loramix eval`: the paper's comparison, item by item, written as it goes and resumable.

Configs (comma-separated; an `option=value` item belongs to the config before it):
  base                     the base model alone
  expert:NAME              one expert alone, on every task (all four give the specialist matrix)
  oracle                   each task's own expert (the paper's "fine-tuned" row)
  uniform                  all experts, weight 1/n each
  prompt                   route once, on the prompt
  tla:k=K                  token-level adaptation, re-routing every K tokens
  arrow                    PEFT's Arrow router over the same experts (a peer baseline)
  paper                    shorthand for base, oracle, tla:k=1, tla:k=2, tla:k=3, tla:k=4
Options on any config: decode=cached|recompute, merge=exact|linear|paper, route=RULE (e.g. route=softmax:0.1).

Every scored item is one JSON line in OUT/items.jsonl, keyed by what it depends on (base model, the experts
and router it uses, the config's options, the task's generation budget). Re-running skips items whose key is
already there; a half-written line is dropped and redone. Data-parallel runs (`torchrun` or `accelerate launch`)
give each process every N-th item and its own items.rankR.jsonl; the summary reads them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from loramix.baselines import ARROW_SETTINGS
from loramix.bundle import Bundle, BundleFingerprint, resolve_bundle
from loramix.errors import LoramixError
from loramix.generation import GenerationResult
from loramix.hardware import DTYPE_NAMES, Placement
from loramix.hub import HubData
from loramix.metrics import choose_by_loglik
from loramix.mixture import DEFAULT_MERGE, MERGE_MODES
from loramix.options import option
from loramix.paths import data_dir
from loramix.sequences import DEFAULT_DECODE
from loramix.store import REQUIRED_FIELDS, ItemStore, parse_record
from loramix.tasks import TASK_GROUPS, Example, get_task, parse_tasks

# Every stored key hashes `"scoring": 1` (its name since the first results). A prediction does not depend on how
# it is scored, so a metric change does not change keys (that would regenerate everything): it bumps
# SCORING_VERSION, stamped on each record, and `loramix eval --rescore` re-scores the stored predictions.
KEY_SCORING_FIELD = 1
SCORING_VERSION = 2  # 2: ARC reads only a letter that stands alone; GSM8K normalises numbers as the harness does
PAPER_CONFIGS = "base,oracle,tla:k=1,tla:k=2,tla:k=3,tla:k=4"
EVAL_ROUTE = "paper"  # eval's tla:k=K configs are the paper's method: its routing rule unless route= says otherwise
CONFIGS_HELP = (
    "Comma-separated: base, expert:NAME, oracle, uniform, prompt, tla:k=K, arrow, paper (= "
    f"{PAPER_CONFIGS}); options after a config apply to it: decode=, merge=, route=."
)
OPTION_NAMES = ("decode", "merge", "route", "k")
# Which options each config kind depends on, stated once: its name shows them when not the default, and its
# results' cache key holds them.
KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "base": (),
    "arrow": (),
    "expert": ("merge",),
    "oracle": ("merge",),
    "uniform": ("merge",),
    "prompt": ("merge", "route"),
    "tla": ("merge", "route", "k", "decode"),
}


@dataclass(frozen=True)
class EvalConfig:
    kind: str  # base | expert | oracle | uniform | prompt | tla | arrow
    expert: str | None = None
    every_k: int = 2
    decode: str = "cached"
    merge: str = "exact"
    route: str = "paper"

    @property
    def name(self) -> str:
        if self.kind == "expert":
            label = f"expert:{self.expert}"
        elif self.kind == "tla":
            label = f"tla:k={self.every_k}"
        else:
            label = self.kind
        uses = KIND_OPTIONS[self.kind]
        shown = (("decode", self.decode, "cached"), ("merge", self.merge, "exact"), ("route", self.route, "paper"))
        extras = [f"{name}={value}" for name, value, default in shown if name in uses and value != default]
        return ",".join([label, *extras])

    def route_for(self, task: str, bundle: Bundle) -> str:
        """The --route value this config uses on `task`."""
        if self.kind == "base":
            return "base"
        if self.kind == "expert":
            return f"oracle:{self.expert}"
        if self.kind == "oracle":
            return f"oracle:{oracle_expert(bundle, task)}"
        if self.kind == "uniform":
            return "uniform"
        if self.kind == "prompt":
            return f"prompt:{self.route}"
        return self.route


def oracle_expert(bundle: Bundle, task: str) -> str:
    name = oracle_experts(bundle).get(task)
    if name is None:
        raise LoramixError(f"The bundle has no expert for task '{task}', so the 'oracle' config cannot run on it.")
    return name


def oracle_experts(bundle: Bundle) -> dict[str, str]:
    """Task -> the bundle's expert for it (what `oracle` uses)."""
    chosen: dict[str, str] = {}
    for entry in bundle.experts:  # a task's first expert
        chosen.setdefault(entry.task or entry.name, entry.name)
    return chosen


def parse_configs(spec: str, bundle: Bundle, defaults: EvalConfig | None = None) -> list[EvalConfig]:
    """Parse --configs (see the module docstring)."""
    defaults = defaults or EvalConfig(kind="tla")
    items = []
    for item in (part.strip() for part in spec.split(",")):
        items += PAPER_CONFIGS.split(",") if item == "paper" else [item] if item else []
    groups: list[list[str]] = []
    for item in items:
        key = item.split("=", 1)[0]
        if "=" in item and ":" not in key and key in OPTION_NAMES and groups:
            groups[-1].append(item)  # an option of the config before it
        else:
            groups.append([item])
    configs = []
    for head, *options in groups:
        name, _, argument = head.partition(":")
        settings: dict = {"decode": defaults.decode, "merge": defaults.merge, "route": defaults.route}
        if argument.startswith("k="):
            options.insert(0, argument)
            argument = ""
        for setting in options:
            key, _, value = setting.partition("=")
            if key == "k":
                try:
                    settings["every_k"] = int(value)
                except ValueError:
                    raise LoramixError(f"Config '{head}': k must be a whole number, got '{value}'.") from None
            else:
                settings[key] = value
        if name == "expert":
            if argument not in bundle.expert_names:
                raise LoramixError(
                    f"Config '{head}': no expert '{argument}'; the experts are {', '.join(bundle.expert_names)}."
                )
            configs.append(EvalConfig(kind="expert", expert=argument, **settings))
        elif name in ("base", "oracle", "uniform", "prompt", "arrow", "tla") and not argument:
            if name == "tla" and "every_k" not in settings:
                raise LoramixError("Config 'tla' needs k, e.g. tla:k=2.")
            configs.append(EvalConfig(kind=name, **settings))
        else:
            raise LoramixError(
                f"Unknown config '{head}'; use base, expert:NAME, oracle, uniform, prompt, tla:k=K, arrow or paper."
            )
    for config in configs:
        if config.every_k <= 0:
            raise LoramixError(f"Config '{config.name}': k must be positive.")
        if config.decode not in ("cached", "recompute"):
            raise LoramixError(f"Config '{config.name}': decode must be cached or recompute.")
        if config.merge not in MERGE_MODES:
            raise LoramixError(f"Config '{config.name}': merge must be one of {', '.join(MERGE_MODES)}.")
    return list(dict.fromkeys(configs))  # drop repeats, keep order


# ---- what a result depends on ----


def generation_budget(task: str, cap: int | None) -> int:
    budget = get_task(task).max_new_tokens
    return min(budget, cap) if cap else budget


def item_key(
    config: EvalConfig, task: str, bundle: Bundle, fingerprint: BundleFingerprint, split: str, cap: int | None = None,
    hub_data: str | None = None, model_dtype: str = "fp32",
) -> str:  # fmt: skip
    """A hash of everything an item's result depends on, and nothing else (so changes redo only what they touch).
    The model's precision is added only when it is not fp32, so every fp32 result keeps its key."""
    spec = get_task(task)
    parts: dict = {
        "task": task,
        "split": split,
        "budget": generation_budget(task, cap),
        "stop": spec.stop,
        "scoring": KEY_SCORING_FIELD,
        "base": fingerprint.base,
    }
    if hub_data is not None:  # data from the Hub: never the same items as the data folder's (added only here)
        parts["data"] = hub_data
    if model_dtype != "fp32":  # bf16 and fp16 items never mix with fp32 ones (added only here)
        parts["dtype"] = model_dtype
    if config.kind != "base":
        used = (
            [config.route_for(task, bundle).split(":", 1)[1]]
            if config.kind in ("expert", "oracle")
            else list(fingerprint.experts)
        )
        parts["experts"] = [fingerprint.experts[name] for name in used]
    uses = KIND_OPTIONS[config.kind]
    if "merge" in uses:
        parts["merge"] = config.merge
    if "route" in uses:
        parts |= {"router": fingerprint.router, "route": config.route_for(task, bundle)}
        if config.route.startswith("hidden"):  # added only here, so every other key stays as it was
            parts["hidden_router"] = fingerprint.hidden_router
    if "k" in uses:
        parts |= {"k": config.every_k, "decode": config.decode}
    if config.kind == "arrow":
        parts["arrow"] = ARROW_SETTINGS
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


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


def resolve_embedder_dtype(dtype: str) -> str:
    from loramix.router import bf16_routing_pays

    return dtype if dtype != "auto" else ("bf16" if bf16_routing_pays("cpu") else "fp32")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_evaluation(plan: EvalPlan, progress: bool = True, on_batch=None) -> ItemStore:
    """Score every pending (config, task, item); returns the store with everything scored so far."""
    bundle = Bundle.load(resolve_bundle(plan.bundle))
    defaults = EvalConfig(kind="tla", decode=plan.decode, merge=plan.merge, route=plan.route)
    configs = parse_configs(plan.configs, bundle, defaults)
    tasks = plan.task_names()
    routing_dtype = resolve_embedder_dtype(plan.embedder_dtype)
    fingerprint = BundleFingerprint.of(bundle, routing_dtype)
    rank, world = distributed_rank()
    store = ItemStore(plan.out, rank=rank).load()
    root = data_dir(plan.data)
    examples = {task: get_task(task).load(root, plan.split)[: plan.limit] for task in tasks}
    placement = Placement(plan.device, plan.dtype).resolve()
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
