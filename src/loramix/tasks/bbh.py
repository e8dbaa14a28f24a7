"""BIG-Bench Hard: 20 reasoning tasks no expert was trained for (held-out tasks), zero-shot.

Prompt `Question: {input}\n\nAnswer:`, the experts' own template; target ` {target}`. BBH has no training split:
each task's examples are split in two halves by a seeded shuffle, `validation` (choose settings there) and `test`
(report there). Scored by exact match after the usual answer normalisation: the answer is the first line of the
output, trimmed of a final period; an option target `(B)` also accepts `B`, `B)` or `(b)` standing first; a
True/False, yes/no or valid/invalid target is compared case-blind on the first word; a number on the first number.
"""

from __future__ import annotations

import json
import random
import re
from functools import partial

from loramix.tasks.base import DataSource, Example, HubData, Task, require_file

BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "disambiguation_qa", "dyck_languages", "formal_fallacies",
    "geometric_shapes", "hyperbaton", "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "temporal_sequences", "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
)  # fmt: skip
SPLIT_SEED = 0
_OPTION = re.compile(r"^\(([A-R])\)$")
_WORDS = {"true", "false", "yes", "no", "valid", "invalid"}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_of(prediction: str, target: str) -> str:
    """The prediction's answer in the target's form (see the module docstring)."""
    lines = [line.strip() for line in prediction.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = first[:-1] if first.endswith(".") else first
    option = _OPTION.match(target)
    if option:
        found = re.match(r"^\(?([A-Ra-r])\)?(?:[\s.:,]|$)", first)
        return f"({found.group(1).upper()})" if found else first
    if target.lower() in _WORDS:
        word = re.match(r"[A-Za-z]+", first)
        return word.group(0).lower() if word else first.lower()
    if _NUMBER.fullmatch(target):
        number = _NUMBER.search(first)
        return number.group(0) if number else first
    return " ".join(first.split())


def score_bbh(prediction: str, example: Example) -> dict[str, float]:
    target = example.references[0]
    expected = target.lower() if target.lower() in _WORDS else " ".join(target.split())
    return {"exact_match": float(answer_of(prediction, target) == expected)}


def rows(source: DataSource, name: str) -> list[dict]:
    if isinstance(source, HubData):
        return source.rows("lukaemon/bbh", name, "test")
    path = require_file(source / "bbh" / f"{name}.json", f"BIG-Bench Hard task {name}")
    return json.loads(path.read_text(encoding="utf-8"))["examples"]


def load(name: str, source: DataSource, split: str) -> list[Example]:
    items = rows(source, name)
    order = list(range(len(items)))
    random.Random(SPLIT_SEED).shuffle(order)
    half = len(order) // 2
    chosen = sorted(order[:half] if split == "validation" else order[half:])
    return [
        Example(
            id=f"bbh_{name}/{index}",
            prompt=f"Question: {items[index]['input']}\n\nAnswer:",
            target=items[index]["target"],
            references=(items[index]["target"],),
        )
        for index in chosen
    ]


def bbh_task(name: str) -> Task:
    return Task(
        name=f"bbh_{name}",
        title=f"BBH {name.replace('_', ' ')}",
        loader=partial(load, name),
        scorer=score_bbh,
        primary_metric="exact_match",
        splits=("validation", "test"),
        max_new_tokens=32,
        stop=("\n\n",),
        offline_data="BIG-Bench Hard json (suzgunmirac/BIG-Bench-Hard)",
        hub_data=f"lukaemon/bbh {name}",
        held_out=True,
    )


TASKS = tuple(bbh_task(name) for name in BBH_TASKS)
