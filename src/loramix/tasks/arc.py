"""ARC-Challenge science multiple choice: `Question: {stem}\nChoices: {A. text\nB. text ...}\n\nAnswer: {letter}`.

Some items label their options 1-4 instead of A-D; labels are normalised to letters everywhere.
"""

from __future__ import annotations

from pathlib import Path

from loramix.tasks.base import Example, Task, read_jsonl, require_file

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


def load(data_dir: Path, split: str) -> list[Example]:
    path = require_file(data_dir / "arc_challenge" / SPLIT_FILES[split], f"ARC-Challenge {split} file")
    examples = []
    for row in read_jsonl(path):
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


TASK = Task(
    name="arc",
    title="ARC-Challenge",
    loader=load,
    splits=("train", "validation", "test"),
    max_new_tokens=4,
    stop=("\n",),
)
