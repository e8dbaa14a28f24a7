"""ARC-Challenge science multiple choice: `Question: {stem}\nChoices: {A. text\nB. text ...}\n\nAnswer: {letter}`.

Some items label their options 1-4 instead of A-D; labels are normalised to letters everywhere.

Scored by the option letter generated after `Answer:` (`accuracy`), read only where it stands alone ("C", "C.",
"(c)", "C) text", "The answer is C"), never the article of "A brick wall"; the log-likelihood choice among the
item's labels is scored in evaluation, where the model's probabilities are at hand (`choose_by_loglik`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from loramix.tasks.base import DataSource, Example, HubData, Task, read_jsonl, require_file

SPLIT_FILES = {
    "train": "ARC-Challenge-Train.jsonl",
    "validation": "ARC-Challenge-Dev.jsonl",  # ARC's own Dev split: no expert or centroid has seen it
    "test": "ARC-Challenge-Test.jsonl",
}


def normalise_label(label: str) -> str:
    """Map numeric option labels (1-5) to letters (A-E); letters pass through."""
    label = label.strip()
    return "ABCDE"[int(label) - 1] if label.isdigit() and 1 <= int(label) <= 5 else label.upper()


def render_prompt(stem: str, choices: list[tuple[str, str]]) -> str:
    options = "\n".join(f"{label}. {text}" for label, text in choices)
    return f"Question: {stem}\nChoices: {options}\n\nAnswer:"


def rows(source: DataSource, split: str) -> list[dict]:
    """Rows in the shape of AI2's own files; the Hub's flat rows (choices as two lists) are reshaped to it."""
    if isinstance(source, HubData):
        return [
            {
                "id": row["id"],
                "question": {
                    "stem": row["question"],
                    "choices": [
                        {"label": a, "text": b} for a, b in zip(row["choices"]["label"], row["choices"]["text"])
                    ],
                },
                "answerKey": row["answerKey"],
            }
            for row in source.rows("allenai/ai2_arc", "ARC-Challenge", split)
        ]
    return read_jsonl(require_file(source / "arc_challenge" / SPLIT_FILES[split], f"ARC-Challenge {split} file"))


def load(source: DataSource, split: str) -> list[Example]:
    examples = []
    for row in rows(source, split):
        choices = [(normalise_label(c["label"]), c["text"]) for c in row["question"]["choices"]]
        answer = normalise_label(row["answerKey"])
        examples.append(
            Example(
                id=f"arc/{row['id']}",
                prompt=render_prompt(row["question"]["stem"], choices),
                target=answer,
                references=(answer,),
                choices=tuple(label for label, _ in choices),
            )
        )
    return examples


# "(c)", or a capital letter followed by nothing, by punctuation or by a line break, not by a word
_LETTER = re.compile(r"^\s*(?:\(([A-Ea-e])\)|([A-E])(?:$|[\.\):,\n]|\s+$))")
_STATED_LETTER = re.compile(r"answer is:?\s*\(?([A-E])\b", re.IGNORECASE)


def arc_letter(prediction: str) -> str | None:
    """The option letter a generation gives: 'C', ' C.', '(c)', 'C) text', 'The answer is C' -> 'C'."""
    match = _LETTER.match(prediction)
    if match:
        return (match.group(1) or match.group(2)).upper()
    stated = _STATED_LETTER.search(prediction)
    return stated.group(1).upper() if stated else None


def score_arc(prediction: str, example: Example) -> dict[str, float]:
    return {"accuracy": float(arc_letter(prediction) == example.references[0])}


def choose_by_loglik(logprobs: Sequence[float], labels: Sequence[str], candidates: Sequence[str]) -> str:
    """The label with the highest log-probability among the item's own labels."""
    allowed = [(logprobs[candidates.index(label)], label) for label in labels if label in candidates]
    return max(allowed)[1]


TASK = Task(
    name="arc",
    title="ARC-Challenge",
    loader=load,
    scorer=score_arc,
    primary_metric="accuracy",
    answer_letters=("A", "B", "C", "D", "E"),
    splits=("train", "validation", "test"),
    max_new_tokens=4,
    stop=("\n",),
    offline_data="ARC-Challenge jsonl (AI2)",
    hub_data="allenai/ai2_arc ARC-Challenge",
)
