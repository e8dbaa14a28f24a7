"""The report from synthetic scored items (no model): means and CIs, partial cells, paired differences, the
paper's claims, routing accuracy, the data origin, the folder's notes, and results.md section by section."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loramix.eval_configs import SCORING_VERSION
from loramix.report import (
    Scores,
    bootstrap_average_ci,
    claims,
    paired,
    routing_accuracy,
    summarise,
    write_report,
)
from loramix.tasks import TASKS

N = 40  # items per task


def _records(config: str, task: str, values, weights=None, **extra) -> list[dict]:
    metric = TASKS[task].primary_metric
    rows = []
    for i, value in enumerate(values):
        row = {"key": f"{config}|{task}", "config": config, "task": task, "id": f"{task}/{i}", "prediction": "x",
               "scores": {metric: float(value)}, "scoring": SCORING_VERSION, "seconds": 0.5, **extra}  # fmt: skip
        if weights is not None:
            row |= {"weights_mean": weights[i], "reroutes": 4, "frozen_reroutes": 1}
        rows.append(row)
    return rows


def _suite(gain: float) -> list[dict]:
    """base scores 0.2 on every task, oracle 0.6, tla:k=1/2/4 base + gain (+0.05 more at k=2), alternating 0/1
    around those means so every cell has spread."""
    rng = np.random.default_rng(0)
    records = []
    for task in TASKS:
        for config, mean in (("base", 0.2), ("oracle", 0.6), ("tla:k=1", 0.2 + gain), ("tla:k=2", 0.25 + gain),
                             ("tla:k=4", 0.2 + gain)):  # fmt: skip
            values = np.clip(mean + rng.normal(0, 0.05, N), 0, 1)
            records += _records(config, task, values)
    return records


def test_means_cis_and_partial_cells():
    records = _records("base", "gsm8k", [1, 0] * (N // 2)) + _records("tla:k=2", "gsm8k", [1] * 10)
    scores = Scores.from_records(records)
    table = summarise(scores)
    base = table["base"]["gsm8k"]
    assert base["n"] == N and not base["partial"] and base["metrics"]["flexible"]["mean"] == pytest.approx(0.5)
    low, high = base["metrics"]["flexible"]["ci"]
    assert 0.3 < low < 0.5 < high < 0.7  # a 95% CI of a 50% rate over 40 items
    short = table["tla:k=2"]["gsm8k"]
    assert short["partial"] and short["n"] == 10  # shown on its own items, marked
    assert base["seconds"] == pytest.approx(0.5 * N)


def test_paired_difference_uses_common_items_and_averages_tasks():
    records = []
    for task in ("gsm8k", "arc"):
        records += _records("a", task, [0.6] * N) + _records("b", task, [0.4] * (N - 5))
    scores = Scores.from_records(records)
    one = paired(scores, "a", "b", "arc")
    assert one["difference"] == pytest.approx(0.2) and one["n"] == N - 5 and one["ci"] == pytest.approx([0.2, 0.2])
    both = paired(scores, "a", "b")
    assert both["task"] == "average" and both["difference"] == pytest.approx(0.2) and both["n"] == 2 * (N - 5)
    assert paired(scores, "a", "missing", "arc") is None


def test_average_ci_resamples_each_task_on_its_own():
    low, high = bootstrap_average_ci([np.zeros(50), np.ones(50)])
    assert low == high == 0.5  # no spread within a task: the average of task means has none either
    low, high = bootstrap_average_ci([np.array([0.0, 1.0] * 25), np.ones(50)])
    assert low < 0.75 < high


def test_the_claims_follow_the_evidence():
    strong = claims(Scores.from_records(_suite(gain=0.3)))
    assert [c["verdict"] for c in strong] == ["held", "not held", "held"]  # beats base; under the oracle; k=2 best
    assert strong[0]["config"] == "tla:k=2" and len(strong[0]["evidence"]) == 4
    assert strong[2]["best_point_estimate"] == "tla:k=2"
    weak = claims(Scores.from_records(_suite(gain=-0.1)))
    assert weak[0]["verdict"] == "not held"
    lone = claims(Scores.from_records(_records("base", "arc", [1] * N)))
    assert [c["verdict"] for c in lone] == ["not evaluated"] * 3


def test_routing_accuracy_counts_items_whose_top_expert_is_their_own():
    weights = [[0.7, 0.3]] * 30 + [[0.2, 0.8]] * 10
    scores = Scores.from_records(_records("tla:k=1", "arc", [1] * N, weights=weights))
    accuracy = routing_accuracy(scores, ["arc", "squad"], {"arc": "arc"})
    assert accuracy["tla:k=1"]["arc"] == {"n": N, "top_is_own": 0.75, "own_weight": pytest.approx(0.575)}


def test_the_report_files_name_the_data_and_keep_the_notes(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    records = _suite(gain=0.3)
    hub = [dict(r, data="hub openai/gsm8k main") for r in records if r["task"] == "gsm8k"]
    rest = [r for r in records if r["task"] != "gsm8k"]
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hub + rest))
    (out / "notes.md").write_text("This setting departs from the paper in one way.\n")
    results = write_report(out, {"base_model": "tiny", "split": "test"})
    markdown = (out / "results.md").read_text()
    assert results["data"]["gsm8k"] == ["hub openai/gsm8k main"]
    assert f"SQuAD v1.1: {TASKS['squad'].offline_data}" in markdown and "GSM8K: hub openai/gsm8k main" in markdown
    assert "\n\nThis setting departs from the paper in one way.\n" in markdown
    sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    # no expert:NAME configs, no routing weights: no specialist, frozen-routing or routing-accuracy sections
    assert sections == ["## Main table", "## All metrics", "## Paired comparisons", "## The paper's claims", "## Time"]
    row = next(line for line in markdown.splitlines() if line.startswith("| base |"))
    assert row.count("|") == 7  # config, four tasks, the average
    again = write_report(out, {"base_model": "tiny", "split": "test"})
    assert again["table"] == results["table"] and again["claims"] == results["claims"]  # deterministic: fixed seed
