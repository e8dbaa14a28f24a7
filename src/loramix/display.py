"""Terminal rendering: tokens coloured by their dominant expert, weight summaries, tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.table import Table
from rich.text import Text

from loramix.generation import GenerationResult
from loramix.tasks import ALL_TASKS

PALETTE = ["cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta"]


def expert_colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def legend(expert_names: Sequence[str]) -> Text:
    text = Text("experts: ")
    for i, name in enumerate(expert_names):
        text.append(f" {name} ", style=f"bold black on {expert_colour(i)}")
        text.append(" ")
    return text


def token_piece(piece: str, weights: Sequence[float]) -> Text:
    """One token's text coloured by its dominant expert (plain when the experts are off)."""
    if not any(weights):
        return Text(piece)
    dominant = max(range(len(weights)), key=lambda i: weights[i])
    return Text(piece, style=expert_colour(dominant))


def trace(result: GenerationResult, tokenizer) -> Text:
    """The generated text, each token coloured by the expert with the largest weight for it."""
    text = Text()
    for token_id, weights in zip(result.token_ids, result.weights.tolist()):
        text.append_text(token_piece(tokenizer.decode([token_id], skip_special_tokens=True), weights))
    return text


def weights_summary(result: GenerationResult, expert_names: Sequence[str]) -> Table:
    table = Table(title="routing weights over the generated tokens", title_justify="left")
    table.add_column("expert")
    table.add_column("mean weight", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("dominant for", justify="right")
    weights = result.weights if result.weights.numel() else torch.zeros(1, len(expert_names))
    dominant = weights.argmax(dim=1)
    routed = bool(weights.sum() > 0)
    for i, name in enumerate(expert_names):
        column = weights[:, i]
        share = int((dominant == i).sum()) if routed else 0
        table.add_row(
            Text(name, style=expert_colour(i)),
            f"{column.mean():.3f}",
            f"{column.min():.3f}",
            f"{column.max():.3f}",
            f"{share}/{len(result.token_ids)} tokens",
        )
    frozen = (
        f", {result.frozen_reroutes} with the embedder input unchanged (routing frozen)"
        if result.frozen_reroutes
        else ""
    )
    table.caption = f"{len(result.reroutes)} re-routes{frozen}; finished by {result.finish_reason}"
    return table


def timing_line(result: GenerationResult) -> str:
    t = result.timing
    per_token = 1000 * t["total"] / max(t["tokens"], 1)
    return (
        f"{int(t['tokens'])} tokens in {t['total']:.2f}s ({per_token:.1f} ms/token; prefill {t['prefill']:.2f}s, "
        f"decode {t['decode']:.2f}s, routing {t['routing']:.2f}s)"
    )


def rescore_table(changes: list[dict]) -> Table:
    table = Table(title="re-scored from the stored predictions (primary metric x100)", title_justify="left")
    for column in ("config", "task", "items", "changed", "before", "after"):
        table.add_column(column, justify="left" if column in ("config", "task") else "right")
    for c in changes:
        table.add_row(c["config"], c["task"], str(c["n"]), str(c["changed"]), f"{100 * c['old_mean']:.2f}",
                      f"{100 * c['new_mean']:.2f}")  # fmt: skip
    return table


def loss_table(matrix: dict) -> Table:
    table = Table(title="gold-answer loss, nats/token (lower is better)", title_justify="left")
    table.add_column("model")
    for task in matrix["tasks"]:
        table.add_column(f"{task} (n={matrix['tasks'][task]['n']})", justify="right")
    for model in matrix["models"]:
        cells = [matrix["tasks"][t]["loss"].get(model) for t in matrix["tasks"]]
        if any(cells):  # (no oracle row where no task has its own expert)
            table.add_row(model, *(f"{c['mean']:.3f}" if c else "" for c in cells))
    return table


def results_table(results: dict) -> tuple[Table, list[str]]:
    """The main table (primary metric with CIs) and the claims' lines."""
    tasks = [t for t in ALL_TASKS if any(t in row for row in results["table"].values())]
    table = Table(title="primary metric x100 [95% CI]", title_justify="left")
    table.add_column("config")
    for task in tasks:
        table.add_column(f"{task} ({ALL_TASKS[task].primary_metric})", justify="right")
    table.add_column("average", justify="right")
    for config, row in results["table"].items():
        cells = []
        for key in [*tasks, "average"]:
            cell = row.get(key)
            if cell is not None and key != "average":
                cell = cell["metrics"][ALL_TASKS[key].primary_metric]
            cells.append(
                f"{100 * cell['mean']:.1f} [{100 * cell['ci'][0]:.1f}, {100 * cell['ci'][1]:.1f}]" if cell else ""
            )
        table.add_row(config, *cells)
    claims = [f"claim {c['claim']}: {c['text']} [bold]{c['verdict']}[/]" for c in results["claims"]]
    return table, claims


def bundle_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


def show_results(console, results: list[GenerationResult], mixture, show_trace: bool) -> None:
    """Finished generations one after another, coloured by expert with --trace."""
    for result in results:
        console.rule()
        console.print(trace(result, mixture.tokenizer) if show_trace else result.text, highlight=False)
        if show_trace:
            console.print(weights_summary(result, mixture.expert_names))


def show_stream(console, stream, expert_names: Sequence[str], show_trace: bool) -> None:
    """One generation printed token by token as it streams, then (with --trace) its weights and timing."""
    if show_trace:
        console.print(legend(expert_names))
    for event in stream:
        console.print(token_piece(event.text, event.weights) if show_trace else event.text, end="", highlight=False)
    console.print()
    if show_trace:
        result = stream.results()[0]
        console.print(weights_summary(result, expert_names))
        console.print(f"[dim]{timing_line(result)}[/]")
