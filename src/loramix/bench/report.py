"""bench.md and its plot from a bench.json: the speed targets (a table of data), per-cell tables, agreement."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KEPT_MARKER = "<!-- everything below this line is kept when `loramix bench --markdown` rewrites the file -->"


def keep_other_machines(path: Path, text: str) -> str:
    """The new report, followed by whatever an existing report file holds below KEPT_MARKER (e.g. GPU results
    that were measured elsewhere and cannot be rerun here)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if KEPT_MARKER not in old:
        return text
    return text.rstrip("\n") + "\n\n" + old[old.index(KEPT_MARKER) :]


def _cell(report: dict, method: str, n: int, batch: int) -> dict | None:
    return next(
        (c for c in report["cells"] if c["method"] == method and c["tokens"] == n and c["batch"] == batch), None
    )


@dataclass(frozen=True)
class Target:
    """A speed target: a figure measured from a report, and the limit it must meet."""

    text: str
    measure: Callable[[dict], float | None]
    limit: str  # as printed, e.g. "1.10"
    at_least: bool  # the figure must be >= limit (else <= limit)

    def row(self, report: dict) -> dict:
        value = self.measure(report)
        passed = (
            None if value is None else (value >= float(self.limit) if self.at_least else value <= float(self.limit))
        )
        return {"target": self.text, "measured": value, "limit": f"{'>=' if self.at_least else '<='} {self.limit}",
                "passed": passed}  # fmt: skip


def _ratio(numerator: tuple[str, int, int], denominator: tuple[str, int, int], figure: str = "ms_per_step"):
    """report -> figure of one cell / figure of another (method, tokens, batch), None if either is missing."""

    def measure(report: dict) -> float | None:
        top, bottom = _cell(report, *numerator), _cell(report, *denominator)
        return top[figure] / bottom[figure] if top and bottom else None

    return measure


def _over_base_and_routing(method: str):
    """report -> a method's time per step / (the base model's + the method's own routing time), 128 tokens."""

    def measure(report: dict) -> float | None:
        cell, base = _cell(report, method, 128, 1), _cell(report, "base", 128, 1)
        return cell["ms_per_step"] / (base["ms_per_step"] + cell["split_ms"]["routing"]) if cell and base else None

    return measure


TARGETS = (
    Target("cached k=1, 128 tokens, batch 1: x faster than the reference loop",
           _ratio(("reference", 128, 1), ("ours cached k=1", 128, 1)), "10", at_least=True),
    Target("ours cached k=1: time / (base decode + its router embeddings)",
           _over_base_and_routing("ours cached k=1"), "1.10", at_least=False),
    Target("ours cached k=2: time / (base decode + its router embeddings)",
           _over_base_and_routing("ours cached k=2"), "1.10", at_least=False),
    Target("cached k=2, 128 tokens, batch 1: x the base model's time per token",
           _ratio(("ours cached k=2", 128, 1), ("base", 128, 1)), "1.35", at_least=False),
    Target("batch 16, k=4, 128 tokens: x the base model's throughput",
           _ratio(("ours cached k=4", 128, 16), ("base", 128, 16), "tokens_per_second"), "0.8", at_least=True),
)  # fmt: skip


def targets(report: dict) -> list[dict]:
    """The speed targets, each with its measured figure and pass/fail (None when not measured)."""
    return [target.row(report) for target in TARGETS]


PLOTTED = ("reference", "peft-scales k=1", "ours recompute k=1 linear", "ours cached k=1", "ours cached k=4", "base")
BUCKET = 16  # generated tokens per point: the median step time of each bucket


def write_plot(report: dict, path: Path) -> bool:
    """ms per generated token against sequence length at batch 1, for the methods that tell the story, as medians
    per bucket of BUCKET tokens (single steps are noisy), one distinct colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(report["meta"]["tokens"])
    cells = {c["method"]: c for c in report["cells"] if c["batch"] == 1 and c["tokens"] == n and c["step_ms"]}
    shown = [m for m in PLOTTED if m in cells] or list(cells)[:6]
    if not shown:
        return False
    prompt_length = report["meta"].get("prompt_tokens", 0)
    figure, axis = plt.subplots(figsize=(8, 4.5))
    colours = plt.get_cmap("tab10").colors
    for colour, method in zip(colours, shown):
        steps = cells[method]["step_ms"]
        starts = range(0, len(steps), BUCKET)
        lengths = [prompt_length + start + min(BUCKET, len(steps) - start) / 2 for start in starts]
        medians = [statistics.median(steps[start : start + BUCKET]) for start in starts]
        axis.plot(lengths, medians, label=method, color=colour, marker="o", markersize=3, linewidth=1.5)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length (prompt + generated tokens)")
    axis.set_ylabel(f"ms per generated token (median of {BUCKET}, log)")
    axis.set_title(f"batch 1, {n} new tokens")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report_files(
    report: dict, out: Path, command: str, plot_name: str = "ms_per_token.png"
) -> tuple[str, str | None]:
    """Write OUT/bench.md and its plot; returns the markdown and the plot's file name (None when nothing to plot)."""
    plot = plot_name if write_plot(report, out / plot_name) else None
    text = render_markdown(report, plot, command)
    (out / "bench.md").write_text(text, encoding="utf-8")
    return text, plot


def render_markdown(report: dict, plot: str | None, command: str) -> str:
    meta = report["meta"]
    lines = ["# Benchmarks", ""]
    lines += [
        f"- command: `{command}`",
        f"- machine: {meta['machine']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model: `{meta['base_model']}` with experts {', '.join(meta['experts'])} (bundle `{meta['bundle']}`)",
        f"- written: {meta['written']}; median of up to {meta['repeats']} repeats after a warm-up, spread = min-max",
        "",
        "Every method generates exactly N tokens greedily (end-of-sequence suppressed) on the same prompts: one GSM8K "
        "prompt at batch 1, prompts from all four tasks at larger batches. `ms/step` is the time per decode step "
        "(for a batch, one step makes one token per sequence); `reference` and `peft-scales` have no batching and "
        "are measured one sequence at a time.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | |",
        "|---|---|---|---|",
    ]
    for row in targets(report):
        value = "" if row["measured"] is None else f"{row['measured']:.2f}"
        verdict = {True: "met", False: "**missed**", None: "not measured"}[row["passed"]]
        lines.append(f"| {row['target']} | {value} | {row['limit']} | {verdict} |")
    for batch in meta["batches"]:
        for n in meta["tokens"]:
            rows = [c for c in report["cells"] if c["batch"] == batch and c["tokens"] == n]
            if not rows:
                continue
            base = _cell(report, "base", n, batch)
            ref = _cell(report, "reference", n, 1)
            lines += ["", f"## {n} new tokens, batch {batch}", ""]
            lines += [
                "| method | ms/step | spread | tokens/s | x reference | x base | forward | routing | merge | other "
                "| peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for c in rows:
                split = c["split_ms"]
                vs_ref = f"{ref['ms_per_step'] * batch / c['ms_per_step']:.1f}" if ref else ""
                vs_base = f"{c['ms_per_step'] / base['ms_per_step']:.2f}" if base else ""
                lines.append(
                    f"| {c['method']} | {c['ms_per_step']:.1f} | {c['spread'][0]:.1f}-{c['spread'][1]:.1f} | "
                    f"{c['tokens_per_second']:.1f} | {vs_ref} | {vs_base} | {split.get('forward', 0):.1f} | "
                    f"{split.get('routing', 0):.1f} | {split.get('merge', 0):.1f} | {split.get('other', 0):.1f} | "
                    f"{c['peak_rss_mb'] if c['peak_rss_mb'] is not None else ''} |"
                )
    grid = report.get("merge_grid") or []
    if grid:
        base = next(c for c in grid if c["method"] == "base")
        lines += [
            "",
            f"## Merge modes x decode modes x k ({grid[0]['tokens']} new tokens, batch 1, one round-robin)",
            "",
        ]
        lines += ["| method | ms/step | spread | x base | routing | other |", "|---|---|---|---|---|---|"]
        for c in grid:
            lines.append(
                f"| {c['method']} | {c['ms_per_step']:.1f} | {c['spread'][0]:.1f}-{c['spread'][1]:.1f} | "
                f"{c['ms_per_step'] / base['ms_per_step']:.2f} | {c['split_ms'].get('routing', 0):.1f} | "
                f"{c['split_ms'].get('other', 0):.1f} |"
            )
    if report["agreement"]:
        lines += ["", "## Outputs that must agree", "", "| check | where | same tokens |", "|---|---|---|"]
        for a in report["agreement"]:
            lines.append(f"| {a['check']} | {a['detail']} | {'yes' if a['same_tokens'] else '**no**'} |")
    if plot:
        lines += ["", f"![ms per token vs sequence length]({plot})"]
    lines += [
        "",
        "Columns: `x reference` is how many times faster than the reference loop per generated token (the reference "
        "at batch B costs B times its batch-1 step); `x base` is ms/step relative to the base model decoding the same "
        "batch with HF generate. The split is ms per step: `forward` the model, `routing` embedding + similarities, "
        "`merge` PEFT adapter building or scale setting, `other` the rest of the loop. Peak RSS is the process's "
        "resident memory above its level when the cell began (models already loaded), sampled every 5 ms.",
        "",
    ]
    return "\n".join(lines)
