"""The paper's three claims, each judged by a paired bootstrap CI on the configs that test it."""

from __future__ import annotations

import numpy as np

from loramix.report.scores import Scores, paired, tla_configs, variant_of
from loramix.report.stats import verdict
from loramix.tasks import ALL_TASKS

TLA_BEST_K = 2  # the paper's best k, the config its claims are judged on


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
    family = [c for c in tla if variant_of(c) == "" and scores.has_all_tasks(c)]
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
        c: float(np.mean([scores.values(c, t, ALL_TASKS[t].primary_metric, shared[t]).mean() for t in scores.tasks]))
        for c in configs
    }


def highest_as_shown(averages: dict[str, float]) -> str:
    """The config with the highest average, or all those tied with it as the report prints them (x100, 0.1)."""
    top = f"{100 * max(averages.values()):.1f}"
    tied = [config for config, value in averages.items() if f"{100 * value:.1f}" == top]
    return tied[0] if len(tied) == 1 else ", ".join(tied) + " (equal to one decimal)"
