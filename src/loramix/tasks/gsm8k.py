"""GSM8K grade-school math: `Question: {question}\n\nAnswer: {worked solution ending #### N}`."""

from __future__ import annotations

from loramix.metrics import score_gsm8k
from loramix.tasks.base import DataSource, Example, HubData, Task, read_jsonl, require_file


def final_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution."""
    return solution.split("####")[-1].strip()


def render_prompt(question: str) -> str:
    return f"Question: {question}\n\nAnswer:"


def rows(source: DataSource, split: str) -> list[dict]:
    if isinstance(source, HubData):
        return source.rows("openai/gsm8k", "main", split)
    return read_jsonl(require_file(source / "gsm8k" / f"{split}.jsonl", f"GSM8K {split} file"))


def load(source: DataSource, split: str) -> list[Example]:
    return [
        Example(
            id=f"gsm8k/{split}/{index}",
            prompt=render_prompt(row["question"]),
            target=row["answer"],
            references=(final_answer(row["answer"]),),
        )
        for index, row in enumerate(rows(source, split))
    ]


TASK = Task(
    name="gsm8k",
    title="GSM8K",
    loader=load,
    scorer=score_gsm8k,
    primary_metric="flexible",
    splits=("train", "test"),
    max_new_tokens=256,
    stop=("\n\nQuestion:",),
    offline_data="gsm8k train/test jsonl",
    hub_data="openai/gsm8k main",
)
