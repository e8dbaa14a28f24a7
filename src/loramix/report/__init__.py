"""From scored items to evidence: means with 95% bootstrap CIs, paired comparisons, the paper's claims, plots.

Every figure is computed from OUT/items*.jsonl alone, so a report can be regenerated at any time
(`loramix eval --report-only`). One module per idea: `stats` (bootstrap), `scores` (the tables), `claims` (the
paper's three claims), `plots`, `markdown` (results.md, one function per section).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from loramix import __version__
from loramix.evaluation import load_records
from loramix.report.claims import TLA_BEST_K, claims, highest_as_shown, shared_item_averages
from loramix.report.markdown import render_markdown
from loramix.report.plots import write_plots
from loramix.report.scores import (
    Scores,
    answer_loss_matrix,
    data_origins,
    own_expert_gains,
    paired,
    paired_comparisons,
    routing_accuracy,
    routing_means,
    summarise,
)
from loramix.report.stats import bootstrap_average_ci, bootstrap_mean_ci, verdict
from loramix.specialist import loss_store
from loramix.system import git_revision, machine_description, package_versions

NOTES_FILE = "notes.md"  # a results folder's own remarks (e.g. how its setting departs from the paper), shown as given

__all__ = [
    "TLA_BEST_K", "Scores", "answer_loss_matrix", "bootstrap_average_ci", "bootstrap_mean_ci", "claims",
    "highest_as_shown", "own_expert_gains", "paired", "paired_comparisons", "routing_accuracy", "routing_means",
    "shared_item_averages", "summarise", "verdict", "write_report",
]  # fmt: skip


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
        meta = meta or {}
        results["answer_loss"] = answer_loss_matrix(loss_records, meta.get("experts"), meta.get("oracle_experts"))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plots = write_plots(out, scores, results)
    notes_file = out / NOTES_FILE
    notes = notes_file.read_text(encoding="utf-8").strip() if notes_file.is_file() else ""
    (out / "results.md").write_text(render_markdown(scores, results, plots, notes), encoding="utf-8")
    return results


def report_meta(bundle: Path | None, split: str) -> dict:
    """What a report says of its run: the bundle, base model, experts, split, the command, each task's expert."""
    import sys

    from loramix.bundle import Bundle, resolve_bundle
    from loramix.eval_configs import oracle_experts
    from loramix.paths import shown_path

    used = Bundle.load(resolve_bundle(bundle))
    return {
        "bundle": shown_path(used.root), "base_model": used.base_model, "experts": used.expert_names, "split": split,
        "command": "loramix " + " ".join(sys.argv[1:]),
        "oracle_experts": oracle_experts(used),
    }  # fmt: skip
