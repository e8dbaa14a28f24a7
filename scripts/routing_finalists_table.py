"""The routing study's test table (ROUTING.md): each finalist per task and on the four-task average, paired against
the paper's rule, `prompt` and the oracle over the same items (95% paired bootstrap CIs), with routing accuracy.

    python scripts/routing_finalists_table.py --out results/smollm2-135m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loramix.bundle import Bundle, resolve_bundle
from loramix.eval_configs import oracle_experts
from loramix.evaluation import load_records
from loramix.report import Scores, paired, routing_accuracy
from loramix.tasks import TASKS

FINALISTS = (
    "tla:k=2",
    "prompt",
    "prompt,route=top1",
    "tla:k=1,route=hidden:29/softmax:0.05",
    "tla:k=256,route=hidden:29/softmax:0.05",
    "tla:k=1,route=hidden:2/top1",
    "oracle",
)
VERSUS = ("tla:k=2", "prompt", "oracle")


def _difference(result: dict | None) -> str:
    if result is None:
        return ""
    low, high = (100 * v for v in result["ci"])
    text = f"{100 * result['difference']:+.1f} [{low:+.1f}, {high:+.1f}]"
    return f"**{text}**" if low > 0 or high < 0 else text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    scores = Scores.from_records(load_records(args.out))
    bundle = Bundle.load(resolve_bundle(None))
    accuracy = routing_accuracy(scores, bundle.expert_names, oracle_experts(bundle))
    finalists = [c for c in FINALISTS if c in scores.configs]
    columns = ["config", "task", "n", "score", "minus the paper's rule", "minus `prompt`", "minus oracle",
               "top is own / own weight"]  # fmt: skip
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for config in finalists:
        tasks = [t for t in scores.tasks if (config, t) in scores.items]
        for task in [*tasks, *([None] if len(tasks) == len(scores.tasks) else [])]:  # the average: all four tasks
            chosen = [task] if task else tasks
            values = [scores.values(config, t, TASKS[t].primary_metric) for t in chosen]
            score, n = 100 * sum(v.mean() for v in values) / len(values), sum(len(v) for v in values)
            cells = [_difference(paired(scores, config, versus, task)) if versus != config else "" for versus in VERSUS]
            routed = accuracy.get(config, {}).get(task) if task else None
            route_cell = f"{100 * routed['top_is_own']:.1f}% / {routed['own_weight']:.2f}" if routed else ""
            name = TASKS[task].title if task else "**average**"
            print(f"| {config} | {name} | {n} | {score:.1f} | " + " | ".join(cells) + f" | {route_cell} |")


if __name__ == "__main__":
    main()
