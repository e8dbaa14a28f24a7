"""results.md: one function per section, each from the results dict (and the Scores for the item sets)."""

from __future__ import annotations

from loramix.report.claims import highest_as_shown
from loramix.report.scores import HINDSIGHT_ROW, ORACLE_ROW, Scores
from loramix.tasks import ALL_TASKS


def _fmt(cell: dict, scale: float = 100.0) -> str:
    low, high = cell["ci"]
    return f"{scale * cell['mean']:.1f} [{scale * low:.1f}, {scale * high:.1f}]"


def _cell(cell: dict, metric: str) -> str:
    text = _fmt(cell["metrics"][metric])
    return f"{text} *partial, n={cell['n']}*" if cell["partial"] else text


def render_markdown(scores: Scores, results: dict, plots: list[str], notes: str = "") -> str:
    """The whole report: a header, then each section that has something to show, in reading order."""
    lines = _header(results, notes)
    if not scores.configs:  # only `loramix specialist` has run
        lines += ["", *_render_answer_loss(results["answer_loss"], results["meta"].get("oracle_experts", {}))]
        return "\n".join([*lines, *(f"![{plot}]({plot})\n" for plot in plots)])
    sections = (
        _main_table(scores, results),
        _all_metrics(scores, results),
        _specialist_matrix(scores, results),
        _render_answer_loss(results["answer_loss"], results["meta"].get("oracle_experts", {}))
        if "answer_loss" in results
        else [],
        _paired(results),
        _claims(results),
        _frozen_routing(scores, results),
        _render_routing_accuracy(results.get("routing_accuracy", {}), scores.tasks),
        _time(results),
    )
    for section in sections:
        lines += section
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def _titles(scores: Scores) -> dict[str, str]:
    return {t: f"{ALL_TASKS[t].title} ({ALL_TASKS[t].primary_metric})" for t in scores.tasks}


def _header(results: dict, notes: str) -> list[str]:
    meta = results["meta"]
    lines = ["# Evaluation results", ""]
    # The report covers every item in the folder, whatever run scored it: `command` is only the last one.
    labels = {"bundle": "bundle", "base_model": "base model", "split": "split", "command": "report written by",
              "git_revision": "git revision", "machine": "machine", "written": "written"}  # fmt: skip
    lines += [f"- {label}: `{meta[key]}`" for key, label in labels.items() if meta.get(key) is not None]
    origins = "; ".join(f"{ALL_TASKS[t].title}: {', '.join(names)}" for t, names in results.get("data", {}).items())
    lines += [f"- data: {origins}"] if origins else []
    return [*lines, "", notes] if notes else lines


def _main_table(scores: Scores, results: dict) -> list[str]:
    table, titles = results["table"], _titles(scores)
    lines = [
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
        cells = [_cell(row[t], ALL_TASKS[t].primary_metric) if t in row else "" for t in scores.tasks]
        if len(scores.tasks) > 1:
            average = row.get("average")
            cells.append(_fmt(average) + (" *partial*" if average["partial"] else "") if average else "")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return lines


def _all_metrics(scores: Scores, results: dict) -> list[str]:
    table = results["table"]
    lines = ["", "## All metrics", ""]
    for task in scores.tasks:
        metrics = sorted({m for c in scores.configs if task in table[c] for m in table[c][task]["metrics"]})
        lines += [
            f"**{ALL_TASKS[task].title}**",
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
    return lines


def _specialist_matrix(scores: Scores, results: dict) -> list[str]:
    table, titles = results["table"], _titles(scores)
    experts = [c for c in scores.configs if c.startswith("expert:")]
    if not experts:
        return []
    lines = [
        "## Specialist matrix",
        "",
        "Each expert alone on every task, and the base model (primary metric x100); its own task in bold.",
        "",
        "| model | " + " | ".join(titles[t] for t in scores.tasks) + " |",
        "|" + "---|" * (len(scores.tasks) + 1),
    ]
    own = results["meta"].get("oracle_experts", {})
    for config in [c for c in ("base",) if c in table] + experts:
        row, name = table[config], config.removeprefix("expert:")
        cells = [_cell(row[t], ALL_TASKS[t].primary_metric) if t in row else "" for t in scores.tasks]
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
    return lines


def _paired(results: dict) -> list[str]:
    if not results["paired"]:
        return []
    lines = [
        "## Paired comparisons",
        "",
        "Difference in the primary metric x100 over the same items, [95% paired bootstrap CI].",
        "",
        "| config | versus | task | difference | n |",
        "|---|---|---|---|---|",
    ]
    for p in results["paired"]:
        difference = _fmt({"mean": p["difference"], "ci": p["ci"]})
        lines.append(f"| {p['config']} | {p['versus']} | {p['task']} | {difference} | {p['n']} |")
    return [*lines, ""]


def _claims(results: dict) -> list[str]:
    lines = ["## The paper's claims", ""]
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
    return [*lines, ""]


def _frozen_routing(scores: Scores, results: dict) -> list[str]:
    table = results["table"]
    frozen = {
        (c, t): table[c][t]["frozen_reroute_share"]
        for c in scores.configs
        for t in scores.tasks
        if t in table[c] and "frozen_reroute_share" in table[c][t]
    }
    if not frozen:
        return []
    lines = [
        "## Frozen routing",
        "",
        "Share of re-routes whose text filled the embedder's 256-word-piece input "
        "(new tokens could not change the weights). `prompt` routes once, so its share is the share of "
        "prompts that already fill it (routed on their first 256 pieces).",
        "",
        "| config | " + " | ".join(ALL_TASKS[t].title for t in scores.tasks) + " |",
        "|" + "---|" * (len(scores.tasks) + 1),
    ]
    for config in scores.configs:
        if any((config, t) in frozen for t in scores.tasks):
            shares = [f"{100 * frozen[(config, t)]:.1f}%" if (config, t) in frozen else "" for t in scores.tasks]
            lines.append(f"| {config} | " + " | ".join(shares) + " |")
    return [*lines, ""]


def _time(results: dict) -> list[str]:
    lines = ["## Time", "", "| config | seconds |", "|---|---|"]
    lines += [f"| {c} | {s} |" for c, s in results["seconds_per_config"].items()]
    return [*lines, ""]


def _render_routing_accuracy(accuracy: dict, tasks: list[str]) -> list[str]:
    if not accuracy:
        return []
    lines = [
        "## Routing accuracy",
        "",
        "Per item, whether the expert with the largest weight (averaged over the answer's tokens) is the item's own "
        "task's expert, and the mean weight that expert gets: top is own % / own weight.",
        "",
        "| config | " + " | ".join(ALL_TASKS[t].title for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    for config, row in accuracy.items():
        cells = [f"{100 * row[t]['top_is_own']:.1f}% / {row[t]['own_weight']:.2f}" if t in row else "" for t in tasks]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _render_answer_loss(matrix: dict, own: dict[str, str]) -> list[str]:
    tasks = list(matrix["tasks"])
    lines = [
        "## Gold-answer loss",
        "",
        "Mean loss of the gold answer under teacher forcing, nats per answer token (lower is better), "
        "[95% bootstrap CI]; its own task's expert in bold. Routed configs recompute their routing at every gold "
        "token exactly as generation would. It shows what the models learned where the task metric sits at the "
        f"floor. Every cell of a column uses the same items. `{ORACLE_ROW}`: each task's own expert; "
        f"`{HINDSIGHT_ROW}`: the expert alone with the lowest loss on that task, chosen after the fact.",
        "",
        "| model | " + " | ".join(f"{ALL_TASKS[t].title} (n={matrix['tasks'][t]['n']})" for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    for model in matrix["models"]:
        cells = []
        for task in tasks:
            cell = matrix["tasks"][task]["loss"].get(model)
            text = f"{cell['mean']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" if cell else ""
            cells.append(f"**{text}**" if text and own.get(task) == model else text)
        if any(cells):
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    own_vs_base = [(task, own[task]) for task in tasks if task in own]
    if own_vs_base:
        lines += ["", "Each task's own expert minus the base model, paired over the same items:", ""]
    for task, model in own_vs_base:
        cell = matrix["tasks"][task]["vs"].get("base", {}).get(model)
        if cell:
            low, high = cell["ci"]
            lines.append(
                f"- {ALL_TASKS[task].title}: {model} {cell['mean']:+.3f} nats/token [{low:+.3f}, {high:+.3f}], "
                f"{'lower' if high < 0 else 'not lower'} than the base model"
            )
    for group, cell in matrix.get("averages", {}).items():
        lines += _render_loss_average(group, cell)
    return [*lines, ""]


def _render_loss_average(group: str, cell: dict) -> list[str]:
    """The average over a group of tasks, and every row minus each reference, paired (negative: lower loss)."""
    references = list(cell["vs"])
    lines = [
        "",
        f"### Average over the {group} tasks ({len(cell['tasks'])})",
        "",
        "Mean of the task means, nats/token, and each row minus each reference row, paired over items "
        "[95% CI, every task resampled on its own]; a CI wholly below 0 means lower loss than that reference.",
        "",
        "| model | loss | " + " | ".join(f"minus {r}" for r in references) + " |",
        "|" + "---|" * (len(references) + 2),
    ]
    for model, loss in cell["loss"].items():
        diffs = []
        for reference in references:
            d = cell["vs"][reference].get(model)
            diffs.append(f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else "")
        lines.append(f"| {model} | {loss['mean']:.3f} [{loss['ci'][0]:.3f}, {loss['ci'][1]:.3f}] | "
                     + " | ".join(diffs) + " |")  # fmt: skip
    return lines
