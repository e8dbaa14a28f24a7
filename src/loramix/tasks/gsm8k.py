"""GSM8K grade-school math: `Question: {question}\n\nAnswer: {worked solution ending #### N}`."""

from __future__ import annotations

from pathlib import Path

from loramix.tasks.base import Example, Task, read_jsonl, require_file


def final_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution."""
    return solution.split("####")[-1].strip()


def render_prompt(question: str) -> str:
    return f"Question: {question}\n\nAnswer:"


def load(data_dir: Path, split: str) -> list[Example]:
    path = require_file(data_dir / "gsm8k" / f"{split}.jsonl", f"GSM8K {split} file")
    return [
        Example(
            id=f"gsm8k/{split}/{index}",
            prompt=render_prompt(row["question"]),
            target=row["answer"],
            references=(final_answer(row["answer"]),),
        )
        for index, row in enumerate(read_jsonl(path))
    ]


TASK = Task(
    name="gsm8k",
    title="GSM8K",
    loader=load,
    splits=("train", "test"),
    max_new_tokens=256,
    stop=("\n\nQuestion:",),
)
