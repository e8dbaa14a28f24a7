"""The report's pictures: score against k per task, the mean routing weights, the gold-answer loss matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loramix.report.claims import TLA_BEST_K
from loramix.report.scores import Scores, k_of, tla_configs, variant_of
from loramix.tasks import ALL_TASKS


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
            metric = ALL_TASKS[task].primary_metric
            for variant in dict.fromkeys(variant_of(c) for c in tla):
                family = sorted((c for c in tla if variant_of(c) == variant and task in table[c]), key=k_of)
                if not family:
                    continue
                ks = [k_of(c) for c in family]
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
            axis.set_title(f"{ALL_TASKS[task].title}")
            axis.set_xlabel("re-route every k tokens")
            axis.set_ylabel(f"{metric} x100")
            axis.set_xticks(sorted({k_of(c) for c in tla}))
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
        axis.set_yticks(range(len(tasks)), [ALL_TASKS[t].title for t in tasks])
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
    axis.set_xticks(range(len(tasks)), [ALL_TASKS[t].title for t in tasks], rotation=20)
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
