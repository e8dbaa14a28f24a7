"""Terminal rendering: tokens coloured by their dominant expert, weight summaries, tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.table import Table
from rich.text import Text

from loramix.generation import GenerationResult

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
