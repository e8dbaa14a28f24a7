"""The scored items as tables: per config and task, every metric's mean and CI; paired differences; routing."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from loramix.report.stats import bootstrap_average_ci, bootstrap_mean_ci, mean_ci
from loramix.tasks import ALL_TASKS


@dataclass
class Scores:
    """Per (config, task): item id -> score dict, plus seconds and routing weights."""

    items: dict[tuple[str, str], dict[str, dict]]
    seconds: dict[tuple[str, str], float]
    weights: dict[tuple[str, str], list[list[float]]]
    frozen: dict[tuple[str, str], tuple[int, int]]
    configs: list[str]
    tasks: list[str]

    @classmethod
    def from_records(cls, records: list[dict]) -> Scores:
        items: dict = defaultdict(dict)
        seconds: dict = defaultdict(float)
        weights: dict = defaultdict(list)
        frozen: dict = defaultdict(lambda: (0, 0))
        for record in records:
            cell = (record["config"], record["task"])
            items[cell][record["id"]] = record["scores"]
            seconds[cell] += record.get("seconds", 0.0)
            if "weights_mean" in record:
                weights[cell].append(record["weights_mean"])
            if "reroutes" in record:
                done, total = frozen[cell]
                frozen[cell] = (done + record.get("frozen_reroutes", 0), total + record["reroutes"])
        configs = list(dict.fromkeys(r["config"] for r in records))
        tasks = [t for t in ALL_TASKS if any(r["task"] == t for r in records)]
        return cls(dict(items), dict(seconds), dict(weights), dict(frozen), configs, tasks)

    def alias_oracle(self, oracle_experts: dict[str, str]) -> None:
        """`expert:E` on E's own task is the `oracle` on it (same key, so scored once): give it to both."""
        for task, expert in oracle_experts.items():
            config = f"expert:{expert}"
            if config not in self.configs:
                continue
            for a, b in ((config, "oracle"), ("oracle", config)):
                if (a, task) not in self.items and (b, task) in self.items:
                    self.items[(a, task)] = self.items[(b, task)]

    def reference_ids(self, task: str) -> list[str]:
        """The largest item set any config has scored on `task`: the main table compares configs on it."""
        cells = [set(self.items[(c, task)]) for c in self.configs if (c, task) in self.items]
        return sorted(max(cells, key=len)) if cells else []

    def cell_ids(self, config: str, task: str) -> tuple[list[str], bool]:
        """The items a table cell averages, and whether the config is still partial there (then its own items,
        fewer than the reference set; such cells are marked with their n and are not comparable)."""
        own = set(self.items.get((config, task), {}))
        reference = self.reference_ids(task)
        return (reference, False) if own >= set(reference) else (sorted(own), True)

    def values(self, config: str, task: str, metric: str, ids: list[str] | None = None) -> np.ndarray:
        cell = self.items.get((config, task), {})
        chosen = ids if ids is not None else sorted(cell)
        return np.array([cell[i][metric] for i in chosen if i in cell and metric in cell[i]], dtype=float)

    def common_ids(self, task: str, *configs: str) -> list[str]:
        """The items every one of `configs` has scored on `task`."""
        return sorted(set.intersection(*(set(self.items.get((c, task), {})) for c in configs)))

    def has_all_tasks(self, config: str) -> bool:
        return all((config, task) in self.items for task in self.tasks)


def summarise(scores: Scores) -> dict:
    """Per config and task: every metric's mean and CI over the task's reference items (Scores.cell_ids), so the
    cells of a task compare the same items; a config still short of them is `partial` (its own items)."""
    table: dict = {}
    for config in scores.configs:
        row: dict = {}
        primary_values = []
        for task in scores.tasks:
            cell = scores.items.get((config, task))
            if not cell:
                continue
            ids, partial = scores.cell_ids(config, task)
            primary_values.append(scores.values(config, task, ALL_TASKS[task].primary_metric, ids))
            metrics = sorted({m for s in cell.values() for m in s})
            row[task] = {
                "n": len(ids),
                "partial": partial,
                "primary": ALL_TASKS[task].primary_metric,
                "metrics": {m: mean_ci(scores.values(config, task, m, ids)) for m in metrics},
                "seconds": round(scores.seconds.get((config, task), 0.0), 1),
            }
            if (config, task) in scores.frozen and scores.frozen[(config, task)][1]:
                done, total = scores.frozen[(config, task)]
                row[task]["frozen_reroute_share"] = round(done / total, 4)
        if scores.has_all_tasks(config) and len(scores.tasks) > 1:
            low, high = bootstrap_average_ci(primary_values)
            partial = any(row[t]["partial"] for t in scores.tasks)
            row["average"] = {
                "mean": float(np.mean([v.mean() for v in primary_values])),
                "ci": [low, high],
                "partial": partial,
            }
        table[config] = row
    return table


def paired(scores: Scores, config: str, versus: str, task: str | None = None) -> dict | None:
    """Difference config - versus on the primary metric, over the items both scored (task=None: the average)."""
    tasks = [task] if task else scores.tasks
    diffs = []
    for t in tasks:
        ids = scores.common_ids(t, config, versus)
        if not ids:
            return None
        metric = ALL_TASKS[t].primary_metric
        diffs.append(scores.values(config, t, metric, ids) - scores.values(versus, t, metric, ids))
    low, high = bootstrap_average_ci(diffs) if len(diffs) > 1 else bootstrap_mean_ci(diffs[0])
    return {
        "config": config,
        "versus": versus,
        "task": task or "average",
        "difference": float(np.mean([d.mean() for d in diffs])),
        "ci": [low, high],
        "n": int(sum(len(d) for d in diffs)),
    }


def tla_configs(scores: Scores) -> list[str]:
    return [c for c in scores.configs if c.startswith("tla:")]


def plain_config(config: str) -> str:
    """A tla config without its options: 'tla:k=2,merge=paper' -> 'tla:k=2'."""
    return config.split(",")[0]


def k_of(config: str) -> int:
    return int(plain_config(config).split("=")[1])


def variant_of(config: str) -> str:
    """The options of a tla config other than k ('' for the paper's default cached/exact/paper-rule)."""
    return ",".join(config.split(",")[1:])


def paired_comparisons(scores: Scores) -> list[dict]:
    """Every routed config against the oracle and the base model; every tla variant (decode, merge, weights)
    against the same k with the defaults, which answers whether that option changes quality."""
    pairs = [
        (config, versus)
        for config in tla_configs(scores) + [c for c in ("prompt", "uniform", "arrow") if c in scores.configs]
        for versus in ("oracle", "base")
        if versus in scores.configs
    ]
    pairs += [
        (config, plain_config(config))
        for config in tla_configs(scores)
        if variant_of(config) and plain_config(config) in scores.configs
    ]
    rows = []
    for config, versus in pairs:
        for task in [*scores.tasks, None]:
            result = paired(scores, config, versus, task)
            if result is not None:
                rows.append(result)
    return rows


def own_expert_gains(scores: Scores) -> list[dict]:
    """Each task's own expert (the oracle there) minus the base model, paired: is every expert better than
    the base model on its own task, by the task metric? (`paired` gives None where either has no items.)"""
    return [result for task in scores.tasks if (result := paired(scores, "oracle", "base", task))]


def routing_means(scores: Scores) -> dict:
    """Mean routing weight per expert, per config and task (which expert each task's prompts lean to)."""
    out: dict = defaultdict(dict)
    for (config, task), rows in scores.weights.items():
        if rows:
            out[config][task] = [round(float(v), 4) for v in np.mean(np.array(rows), axis=0)]
    return dict(out)


def routing_accuracy(scores: Scores, experts: list[str], oracle_experts: dict[str, str]) -> dict:
    """Per routed config (token-level or prompt-level) and task: the share of items whose largest mean weight
    is the task's own expert, and the mean weight the own expert gets. It explains the task scores."""
    out: dict = defaultdict(dict)
    for (config, task), rows in scores.weights.items():
        own = oracle_experts.get(task)
        if not rows or own not in experts or not config.startswith(("tla", "prompt")):
            continue
        weights = np.array(rows)
        index = experts.index(own)
        out[config][task] = {
            "n": len(rows),
            "top_is_own": round(float((weights.argmax(axis=1) == index).mean()), 4),
            "own_weight": round(float(weights[:, index].mean()), 4),
        }
    return dict(out)


ORACLE_ROW = "oracle"  # each task's own expert
HINDSIGHT_ROW = "best expert (hindsight)"  # each task's expert of the lowest mean loss there
LOSS_REFERENCES = ("base", "uniform", HINDSIGHT_ROW, ORACLE_ROW)


def answer_loss_matrix(records: list[dict], experts: list[str] | None = None, own: dict | None = None) -> dict:
    """Per task: each model's (config's) mean gold-answer loss (nats/token) over the items every one of them scored
    there, two derived rows (the task's own expert, `oracle`; and the expert alone of the lowest mean loss on that
    task, chosen in hindsight: an upper bound for any routing that picks one expert per task), and every row minus
    each reference row (base, uniform, best expert, oracle), paired over those items. Averages over the trained
    tasks and over the held-out ones resample every task on its own."""
    losses: dict = defaultdict(dict)
    for record in records:
        losses[(record["model"], record["task"])][record["id"]] = record["nll"]
    models = sorted(dict.fromkeys(r["model"] for r in records), key=lambda m: m != "base")  # base first
    experts = [e for e in (experts or []) if e in models]
    matrix: dict = {"models": [*models, ORACLE_ROW, HINDSIGHT_ROW], "tasks": {}, "averages": {}}
    per_task_values: dict = {}
    for task in (t for t in ALL_TASKS if any((m, t) in losses for m in models)):
        present = [m for m in models if (m, task) in losses]
        ids = sorted(set.intersection(*(set(losses[(m, task)]) for m in present)))
        values = {m: np.array([losses[(m, task)][i] for i in ids]) for m in present}
        if own and own.get(task) in values:
            values[ORACLE_ROW] = values[own[task]]
        scored = [e for e in experts if e in values]
        if scored and ids:
            best = min(scored, key=lambda e: values[e].mean())
            values[HINDSIGHT_ROW] = values[best]
        row: dict = {"n": len(ids), "loss": {m: mean_ci(v) for m, v in values.items()}, "vs": {}}
        row["hindsight_expert"] = best if scored and ids else None
        for reference in (r for r in LOSS_REFERENCES if r in values and ids):
            row["vs"][reference] = {}
            for model in (m for m in values if m != reference):
                difference = values[model] - values[reference]
                low, high = bootstrap_mean_ci(difference)
                row["vs"][reference][model] = {"mean": float(difference.mean()), "ci": [low, high]}
        row["vs_base"] = row["vs"].get("base", {})
        matrix["tasks"][task] = row
        per_task_values[task] = values
    for group, held_out in (("trained", False), ("held-out", True)):
        tasks = [t for t in per_task_values if ALL_TASKS[t].held_out == held_out and matrix["tasks"][t]["n"]]
        if not tasks:
            continue
        shared = set.intersection(*(set(per_task_values[t]) for t in tasks))
        cell: dict = {"tasks": tasks, "loss": {}, "vs": {}}
        for model in (m for m in matrix["models"] if m in shared):
            per_task = [per_task_values[t][model] for t in tasks]
            low, high = bootstrap_average_ci(per_task)
            cell["loss"][model] = {"mean": float(np.mean([v.mean() for v in per_task])), "ci": [low, high]}
        for reference in (r for r in LOSS_REFERENCES if r in shared):
            cell["vs"][reference] = {}
            for model in (m for m in matrix["models"] if m in shared and m != reference):
                differences = [per_task_values[t][model] - per_task_values[t][reference] for t in tasks]
                low, high = bootstrap_average_ci(differences)
                mean = float(np.mean([d.mean() for d in differences]))
                cell["vs"][reference][model] = {"mean": mean, "ci": [low, high]}
        matrix["averages"][group] = cell
    return matrix


def data_origins(records: list[dict]) -> dict[str, list[str]]:
    """Per task, the data its items came from (records before this field existed came from the data folder)."""
    origins: dict[str, set[str]] = {}
    for record in records:
        origins.setdefault(record["task"], set()).add(record.get("data") or ALL_TASKS[record["task"]].offline_data)
    return {task: sorted(names) for task, names in origins.items()}
