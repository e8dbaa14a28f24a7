"""From scored items to evidence: means with 95% bootstrap CIs, paired comparisons, the paper's claims, plots.

Every figure is computed from OUT/items*.jsonl alone, so a report can be regenerated at any time.
Confidence intervals are percentile bootstraps over items (2,000 resamples, fixed seed). Paired comparisons
resample the same items for both configs. The average over tasks is the mean of the task means; its CI
resamples every task independently.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from loramix import __version__
from loramix.evaluation import load_records
from loramix.metrics import PRIMARY_METRIC
from loramix.specialist import loss_store
from loramix.system import git_revision, machine_description, package_versions
from loramix.tasks import TASKS

RESAMPLES = 2000
SEED = 0
TLA_BEST_K = 2  # the paper's best k, the config its claims are judged on


def bootstrap_mean_ci(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_average_ci(
    per_task: list[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """CI of the mean of task means, resampling each task's items independently."""
    rng = np.random.default_rng(seed)
    averages = np.zeros(resamples)
    for values in per_task:
        averages += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    averages /= len(per_task)
    return float(np.percentile(averages, 2.5)), float(np.percentile(averages, 97.5))


def verdict(low: float, high: float) -> str:
    """held: the whole CI favours the claim; not held: the whole CI goes against it; else inconclusive."""
    if low > 0:
        return "held"
    if high < 0:
        return "not held"
    return "inconclusive"


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
        tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
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
            primary_values.append(scores.values(config, task, PRIMARY_METRIC[task], ids))
            metrics = sorted({m for s in cell.values() for m in s})
            row[task] = {
                "n": len(ids),
                "partial": partial,
                "primary": PRIMARY_METRIC[task],
                "metrics": {m: _mean_ci(scores.values(config, task, m, ids)) for m in metrics},
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


def _mean_ci(values: np.ndarray) -> dict:
    low, high = bootstrap_mean_ci(values)
    return {"mean": float(values.mean()) if len(values) else float("nan"), "ci": [low, high]}


def paired(scores: Scores, config: str, versus: str, task: str | None = None) -> dict | None:
    """Difference config - versus on the primary metric, over the items both scored (task=None: the average)."""
    tasks = [task] if task else scores.tasks
    diffs = []
    for t in tasks:
        ids = scores.common_ids(t, config, versus)
        if not ids:
            return None
        metric = PRIMARY_METRIC[t]
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


def _plain(config: str) -> str:
    """A tla config without its options: 'tla:k=2,merge=paper' -> 'tla:k=2'."""
    return config.split(",")[0]


def _k_of(config: str) -> int:
    return int(_plain(config).split("=")[1])


def _variant(config: str) -> str:
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
        (config, _plain(config))
        for config in tla_configs(scores)
        if _variant(config) and _plain(config) in scores.configs
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


def claims(scores: Scores) -> list[dict]:
    tla = tla_configs(scores)
    headline = next((c for c in tla if c == f"tla:k={TLA_BEST_K}"), tla[0] if tla else None)
    out = []
    text = "Token-level adaptation beats the base model on each of the four tasks."
    if headline and "base" in scores.configs:
        per_task = [paired(scores, headline, "base", t) for t in scores.tasks]
        per_task = [p for p in per_task if p]
        verdicts = [verdict(*p["ci"]) for p in per_task]
        overall = (
            "held"
            if verdicts and all(v == "held" for v in verdicts) and len(per_task) == 4
            else ("not held" if "not held" in verdicts else "inconclusive")
        )
        out.append({"claim": 1, "text": text, "config": headline, "verdict": overall, "evidence": per_task})
    else:
        out.append({"claim": 1, "text": text, "verdict": "not evaluated", "evidence": "needs base and a tla config"})
    text = "Its average over the four tasks beats the average of the individual task experts."
    result = paired(scores, headline, "oracle") if headline and "oracle" in scores.configs else None
    if result and len(scores.tasks) == 4:
        out.append(
            {"claim": 2, "text": text, "config": headline, "verdict": verdict(*result["ci"]), "evidence": [result]}
        )
    else:
        out.append(
            {
                "claim": 2,
                "text": text,
                "verdict": "not evaluated",
                "evidence": "needs oracle and a tla config on all four tasks",
            }
        )
    text = "Re-routing every other token (k=2) gives the best results among the k tried."
    family = [c for c in tla if _variant(c) == "" and scores.has_all_tasks(c)]
    best = f"tla:k={TLA_BEST_K}"
    if best in family and len(family) > 1:
        comparisons = [paired(scores, best, other) for other in family if other != best]
        comparisons = [c for c in comparisons if c]
        verdicts = [verdict(*c["ci"]) for c in comparisons]
        overall = (
            "held" if all(v == "held" for v in verdicts) else ("not held" if "not held" in verdicts else "inconclusive")
        )
        averages = shared_item_averages(scores, family)
        top = max(averages, key=averages.get)
        out.append(
            {
                "claim": 3,
                "text": text,
                "verdict": overall,
                "best_point_estimate": top,
                "averages": averages,
                "evidence": comparisons,
            }
        )
    else:
        out.append(
            {"claim": 3, "text": text, "verdict": "not evaluated", "evidence": "needs tla:k=2 and other k on all tasks"}
        )
    return out


def shared_item_averages(scores: Scores, configs: list[str]) -> dict[str, float]:
    """Each config's average of the task means, every task on the items all `configs` have scored there
    (a config that is further along must not be compared on a different item set)."""
    shared = {t: scores.common_ids(t, *configs) for t in scores.tasks}
    return {
        c: float(np.mean([scores.values(c, t, PRIMARY_METRIC[t], shared[t]).mean() for t in scores.tasks]))
        for c in configs
    }


def highest_as_shown(averages: dict[str, float]) -> str:
    """The config with the highest average, or all those tied with it as the report prints them (x100, 0.1)."""
    top = f"{100 * max(averages.values()):.1f}"
    tied = [config for config, value in averages.items() if f"{100 * value:.1f}" == top]
    return tied[0] if len(tied) == 1 else ", ".join(tied) + " (equal to one decimal)"


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


def answer_loss_matrix(records: list[dict]) -> dict:
    """Per task: each model's mean gold-answer loss (nats/token) over the items every model scored there, and each
    expert minus the base model, paired over those items (records from `loramix specialist`)."""
    losses: dict = defaultdict(dict)
    for record in records:
        losses[(record["model"], record["task"])][record["id"]] = record["nll"]
    models = sorted(dict.fromkeys(r["model"] for r in records), key=lambda m: m != "base")  # base first
    matrix: dict = {"models": models, "tasks": {}}
    for task in (t for t in TASKS if any((m, t) in losses for m in models)):
        present = [m for m in models if (m, task) in losses]
        ids = sorted(set.intersection(*(set(losses[(m, task)]) for m in present)))
        values = {m: np.array([losses[(m, task)][i] for i in ids]) for m in present}
        row: dict = {"n": len(ids), "loss": {m: _mean_ci(v) for m, v in values.items()}, "vs_base": {}}
        if "base" in values and ids:
            for model in present[1:]:
                difference = values[model] - values["base"]
                low, high = bootstrap_mean_ci(difference)
                row["vs_base"][model] = {"mean": float(difference.mean()), "ci": [low, high]}
        matrix["tasks"][task] = row
    return matrix


# ---- writing ----


def data_origins(records: list[dict]) -> dict[str, list[str]]:
    """Per task, the data its items came from (records before this field existed came from the data folder)."""
    origins: dict[str, set[str]] = {}
    for record in records:
        origins.setdefault(record["task"], set()).add(record.get("data") or TASKS[record["task"]].offline_data)
    return {task: sorted(names) for task, names in origins.items()}


def write_report(out: Path, meta: dict | None = None) -> dict:
    """Write results.json, results.md and plots into `out` from the items there; returns the results."""
    records = load_records(out)
    loss_records = list(loss_store(out).load().records.values())
    if not records and not loss_records:
        return {}
    scores = Scores.from_records(records)
    scores.alias_oracle((meta or {}).get("oracle_experts", {}))
    results = {
        "meta": {
            "loramix_version": __version__,
            "git_revision": git_revision(),
            "machine": machine_description(),
            "versions": package_versions(),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(meta or {}),
        },
        "data": data_origins(records),
        "table": summarise(scores),
        "paired": paired_comparisons(scores),
        "own_expert_vs_base": own_expert_gains(scores),
        "claims": claims(scores),
        "routing": routing_means(scores),
        "routing_accuracy": routing_accuracy(
            scores, (meta or {}).get("experts", []), (meta or {}).get("oracle_experts", {})
        ),
        "seconds_per_config": {
            c: round(sum(v for (cc, _), v in scores.seconds.items() if cc == c), 1) for c in scores.configs
        },
    }
    if loss_records:
        results["answer_loss"] = answer_loss_matrix(loss_records)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plots = write_plots(out, scores, results)
    (out / "results.md").write_text(render_markdown(scores, results, plots), encoding="utf-8")
    return results


def _fmt(cell: dict, scale: float = 100.0) -> str:
    low, high = cell["ci"]
    return f"{scale * cell['mean']:.1f} [{scale * low:.1f}, {scale * high:.1f}]"


def _cell(cell: dict, metric: str) -> str:
    text = _fmt(cell["metrics"][metric])
    return f"{text} *partial, n={cell['n']}*" if cell["partial"] else text


DEVIATIONS = (
    "Deviations from the paper in this setting: base model SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32) "
    "instead of Llama-2-7b in 4-bit; SQuAD v1.1 train is unavailable offline, so the dev set is split by article "
    "(36 training / 12 test articles); CodeAlpaca-20k is unavailable, so the 2k file stands in (90/10 split); "
    "experts are smaller (see each expert's loramix_expert.json); greedy decoding instead of temperature 0.9 sampling. "
    "Scores are far below Llama-2-7b's; the claims are about relative order."
)


def render_markdown(scores: Scores, results: dict, plots: list[str]) -> str:
    meta, table = results["meta"], results["table"]
    lines = ["# Evaluation results", ""]
    # The report covers every item in the folder, whatever run scored it: `command` is only the last one.
    labels = {"bundle": "bundle", "base_model": "base model", "split": "split", "command": "report written by",
              "git_revision": "git revision", "machine": "machine", "written": "written"}  # fmt: skip
    lines += [f"- {label}: `{meta[key]}`" for key, label in labels.items() if meta.get(key) is not None]
    origins = "; ".join(f"{TASKS[t].title}: {', '.join(names)}" for t, names in results.get("data", {}).items())
    lines += [f"- data: {origins}"] if origins else []
    if meta.get("base_model") == "smollm2-135m":
        lines += ["", DEVIATIONS]
    if not scores.configs:  # only `loramix specialist` has run
        lines += ["", *_render_answer_loss(results["answer_loss"], meta.get("oracle_experts", {}))]
        return "\n".join([*lines, *(f"![{plot}]({plot})\n" for plot in plots)])
    titles = {t: f"{TASKS[t].title} ({PRIMARY_METRIC[t]})" for t in scores.tasks}
    lines += [
        "",
        "## Main table",
        "",
        "Primary metric x100, mean [95% bootstrap CI]. The cells of a column use the same items (n in the "
        "header), except cells marked *partial*: configs that have not scored all of them yet, shown on their own "
        "items and not comparable with the rest of the column (paired comparisons below use common items only).",
        "",
    ]
    header = [
        "config",
        *[f"{titles[t]}, n={len(scores.reference_ids(t))}" for t in scores.tasks],
        *(["average"] if len(scores.tasks) > 1 else []),
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in scores.configs:
        row = table[config]
        cells = [_cell(row[t], PRIMARY_METRIC[t]) if t in row else "" for t in scores.tasks]
        if len(scores.tasks) > 1:
            average = row.get("average")
            cells.append(_fmt(average) + (" *partial*" if average["partial"] else "") if average else "")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")

    lines += ["", "## All metrics", ""]
    for task in scores.tasks:
        metrics = sorted({m for c in scores.configs if task in table[c] for m in table[c][task]["metrics"]})
        lines += [
            f"**{TASKS[task].title}**",
            "",
            "| config | n | " + " | ".join(metrics) + " | seconds |",
            "|" + "---|" * (len(metrics) + 3),
        ]
        for config in scores.configs:
            if task in table[config]:
                cell = table[config][task]
                values = [_fmt(cell["metrics"][m]) if m in cell["metrics"] else "" for m in metrics]
                lines.append(f"| {config} | {cell['n']} | " + " | ".join(values) + f" | {cell['seconds']} |")
        lines.append("")

    experts = [c for c in scores.configs if c.startswith("expert:")]
    if experts:
        lines += [
            "## Specialist matrix",
            "",
            "Each expert alone on every task, and the base model (primary metric x100); its own task in bold.",
            "",
        ]
        lines += [
            "| model | " + " | ".join(titles[t] for t in scores.tasks) + " |",
            "|" + "---|" * (len(scores.tasks) + 1),
        ]
        own = meta.get("oracle_experts", {})
        for config in [c for c in ("base",) if c in table] + experts:
            row, name = table[config], config.removeprefix("expert:")
            cells = [_cell(row[t], PRIMARY_METRIC[t]) if t in row else "" for t in scores.tasks]
            cells = [
                f"**{c}**" if c and own.get(t) == name and config != "base" else c for c, t in zip(cells, scores.tasks)
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if results.get("own_expert_vs_base"):
            lines += ["Each task's own expert minus the base model, paired over the same items (x100):", ""]
            for gain in results["own_expert_vs_base"]:
                low, high = gain["ci"]
                lines.append(
                    f"- {titles[gain['task']]}: {100 * gain['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] "
                    f"(n={gain['n']}), {'better' if low > 0 else 'not clearly better'} than the base model"
                )
            lines.append("")

    if "answer_loss" in results:
        lines += _render_answer_loss(results["answer_loss"], meta.get("oracle_experts", {}))

    if results["paired"]:
        lines += [
            "## Paired comparisons",
            "",
            "Difference in the primary metric x100 over the same items, [95% paired bootstrap CI].",
            "",
        ]
        lines += ["| config | versus | task | difference | n |", "|---|---|---|---|---|"]
        for p in results["paired"]:
            difference = _fmt({"mean": p["difference"], "ci": p["ci"]})
            lines.append(f"| {p['config']} | {p['versus']} | {p['task']} | {difference} | {p['n']} |")
        lines.append("")

    lines += ["## The paper's claims", ""]
    for claim in results["claims"]:
        lines.append(
            f"{claim['claim']}. {claim['text']} **{claim['verdict']}**"
            + (f" (judged on `{claim['config']}`)" if claim.get("config") else "")
        )
        if isinstance(claim["evidence"], list):
            for p in claim["evidence"]:
                lines.append(
                    f"   - {p['config']} vs {p['versus']}, {p['task']}: "
                    + _fmt({"mean": p["difference"], "ci": p["ci"]})
                )
        else:
            lines.append(f"   - {claim['evidence']}")
        if "averages" in claim:
            lines.append(
                "   - averages: "
                + ", ".join(f"{c} {100 * v:.1f}" for c, v in claim["averages"].items())
                + f"; highest: {highest_as_shown(claim['averages'])}"
            )
    lines.append("")

    frozen = {
        (c, t): table[c][t]["frozen_reroute_share"]
        for c in scores.configs
        for t in scores.tasks
        if t in table[c] and "frozen_reroute_share" in table[c][t]
    }
    if frozen:
        lines += [
            "## Frozen routing",
            "",
            "Share of re-routes whose text filled the embedder's 256-word-piece input "
            "(new tokens could not change the weights). `prompt` routes once, so its share is the share of "
            "prompts that already fill it (routed on their first 256 pieces).",
            "",
        ]
        lines += [
            "| config | " + " | ".join(TASKS[t].title for t in scores.tasks) + " |",
            "|" + "---|" * (len(scores.tasks) + 1),
        ]
        for config in scores.configs:
            if any((config, t) in frozen for t in scores.tasks):
                lines.append(
                    f"| {config} | "
                    + " | ".join(
                        f"{100 * frozen[(config, t)]:.1f}%" if (config, t) in frozen else "" for t in scores.tasks
                    )
                    + " |"
                )
        lines.append("")

    lines += _render_routing_accuracy(results.get("routing_accuracy", {}), scores.tasks)
    lines += ["## Time", "", "| config | seconds |", "|---|---|"]
    lines += [f"| {c} | {s} |" for c, s in results["seconds_per_config"].items()]
    lines.append("")
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def _render_routing_accuracy(accuracy: dict, tasks: list[str]) -> list[str]:
    if not accuracy:
        return []
    lines = [
        "## Routing accuracy",
        "",
        "Per item, whether the expert with the largest weight (averaged over the answer's tokens) is the item's own "
        "task's expert, and the mean weight that expert gets: top is own % / own weight.",
        "",
        "| config | " + " | ".join(TASKS[t].title for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    for config, row in accuracy.items():
        cells = [f"{100 * row[t]['top_is_own']:.1f}% / {row[t]['own_weight']:.2f}" if t in row else "" for t in tasks]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _render_answer_loss(matrix: dict, own: dict[str, str]) -> list[str]:
    tasks = list(matrix["tasks"])
    lines = [
        "## Specialist matrix by gold-answer loss",
        "",
        "Mean loss of the gold answer under teacher forcing, nats per answer token (lower is better), "
        "[95% bootstrap CI]; its own task in bold. It shows what each expert learned where the task metric "
        "sits at the floor. Every cell of a column uses the same items.",
        "",
        "| model | " + " | ".join(f"{TASKS[t].title} (n={matrix['tasks'][t]['n']})" for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    for model in matrix["models"]:
        cells = []
        for task in tasks:
            cell = matrix["tasks"][task]["loss"].get(model)
            text = f"{cell['mean']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" if cell else ""
            cells.append(f"**{text}**" if text and own.get(task) == model else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "Each task's own expert minus the base model, paired over the same items:", ""]
    for task in tasks:
        model = own.get(task)
        cell = matrix["tasks"][task]["vs_base"].get(model) if model else None
        if cell:
            low, high = cell["ci"]
            lines.append(
                f"- {TASKS[task].title}: {model} {cell['mean']:+.3f} nats/token [{low:+.3f}, {high:+.3f}], "
                f"{'lower' if high < 0 else 'not lower'} than the base model"
            )
    return [*lines, ""]


def write_plots(out: Path, scores: Scores, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    table = results["table"]
    tla = tla_configs(scores)
    if tla:
        figure, axes = plt.subplots(1, len(scores.tasks), figsize=(4 * len(scores.tasks), 3.4), squeeze=False)
        for axis, task in zip(axes[0], scores.tasks):
            metric = PRIMARY_METRIC[task]
            for variant in dict.fromkeys(_variant(c) for c in tla):
                family = sorted((c for c in tla if _variant(c) == variant and task in table[c]), key=_k_of)
                if not family:
                    continue
                ks = [_k_of(c) for c in family]
                cells = [table[c][task]["metrics"][metric] for c in family]
                means = np.array([100 * c["mean"] for c in cells])
                errors = np.array(
                    [[100 * (c["mean"] - c["ci"][0]) for c in cells], [100 * (c["ci"][1] - c["mean"]) for c in cells]]
                )
                axis.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=variant or "cached")
            for reference, style in (("base", "k--"), ("oracle", "g:")):
                if reference in table and task in table[reference]:
                    axis.axhline(
                        100 * table[reference][task]["metrics"][metric]["mean"],
                        linestyle=style[1:],
                        color=style[0],
                        label=reference,
                    )
            axis.set_title(f"{TASKS[task].title}")
            axis.set_xlabel("re-route every k tokens")
            axis.set_ylabel(f"{metric} x100")
            axis.set_xticks(sorted({_k_of(c) for c in tla}))
        axes[0][0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "score_vs_k.png", dpi=110)
        plt.close(figure)
        written.append("score_vs_k.png")
    routing = results["routing"]
    source = next((c for c in (f"tla:k={TLA_BEST_K}", *tla) if c in routing), None)
    if source:
        tasks = [t for t in scores.tasks if t in routing[source]]
        matrix = np.array([routing[source][t] for t in tasks])
        figure, axis = plt.subplots(figsize=(1.2 * matrix.shape[1] + 2.5, 0.6 * len(tasks) + 1.8))
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        axis.set_yticks(range(len(tasks)), [TASKS[t].title for t in tasks])
        experts = results["meta"].get("experts") or [f"expert {i}" for i in range(matrix.shape[1])]
        axis.set_xticks(range(matrix.shape[1]), experts, rotation=30)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                axis.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if matrix[i, j] < 0.5 else "black",
                )
        axis.set_title(f"mean routing weight ({source})")
        figure.colorbar(image, ax=axis, fraction=0.046)
        figure.tight_layout()
        figure.savefig(out / "routing_weights.png", dpi=110)
        plt.close(figure)
        written.append("routing_weights.png")
    if "answer_loss" in results:
        written.append(_plot_answer_loss(out, results["answer_loss"], plt))
    return written


def _plot_answer_loss(out: Path, matrix: dict, plt) -> str:
    """Heat map of each model's gold-answer loss relative to the base model's, per task (blue: lower)."""
    tasks, models = list(matrix["tasks"]), matrix["models"]
    loss = np.array([[matrix["tasks"][t]["loss"].get(m, {}).get("mean", np.nan) for t in tasks] for m in models])
    base = loss[models.index("base")] if "base" in models else np.nanmin(loss, axis=0)
    relative = loss / base - 1.0
    figure, axis = plt.subplots(figsize=(1.4 * len(tasks) + 2, 0.6 * len(models) + 1.6))
    limit = float(np.nanmax(np.abs(relative))) or 1.0
    image = axis.imshow(relative, vmin=-limit, vmax=limit, cmap="RdBu_r")
    axis.set_xticks(range(len(tasks)), [TASKS[t].title for t in tasks], rotation=20)
    axis.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(tasks)):
            color = "white" if abs(relative[i, j]) > 0.6 * limit else "black"
            text = f"{loss[i, j]:.2f}\n{100 * relative[i, j]:+.0f}%"
            axis.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    axis.set_title("gold-answer loss, nats/token (vs base)")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(out / "answer_loss.png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "answer_loss.png"
