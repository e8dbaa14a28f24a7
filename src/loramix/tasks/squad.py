"""SQuAD v1.1 reading comprehension: `Context:\n{context}\n\nQuestion: {question}\n\nAnswer: {answer}`.

SQuAD v1.1 train is not available offline, so the dev set is split by article (never by question,
which would leak contexts): in file order, every 4th article (index % 4 == 3) is held out for test,
the rest is train. That is 36 training and 12 test articles.
"""

from __future__ import annotations

import json
from pathlib import Path

from loramix.errors import LoramixError
from loramix.tasks.base import Example, Task, require_file

TEST_EVERY = 4


def is_test_article(index: int) -> bool:
    return index % TEST_EVERY == TEST_EVERY - 1


def render_prompt(context: str, question: str) -> str:
    return f"Context:\n{context}\n\nQuestion: {question}\n\nAnswer:"


def load(data_dir: Path, split: str) -> list[Example]:
    path = require_file(data_dir / "squad_v1.1" / "dev-v1.1.json", "SQuAD v1.1 dev file")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise LoramixError(f"{path} is not a SQuAD v1.1 file ({exc}).") from exc
    examples = []
    for index, article in enumerate(articles):
        if is_test_article(index) != (split == "test"):
            continue
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = tuple(a["text"] for a in qa["answers"])
                examples.append(
                    Example(
                        id=f"squad/{qa['id']}",
                        prompt=render_prompt(paragraph["context"], qa["question"]),
                        target=answers[0],
                        references=answers,
                    )
                )
    return examples


TASK = Task(
    name="squad",
    title="SQuAD v1.1",
    loader=load,
    splits=("train", "test"),
    max_new_tokens=32,
    stop=("\n",),
)
