"""SQuAD v1.1 reading comprehension: `Context:\n{context}\n\nQuestion: {question}\n\nAnswer: {answer}`.

Test is the dev set's every 4th article (index % 4 == 3, in file order; 12 of 48), whichever way the data comes.
Train differs: SQuAD v1.1 train is not available offline, so there it is the dev set's other 36 articles (never
split by question, which would leak contexts); from the Hub (`--data-dir hub`) it is the real train split.

Scored by exact match and token F1 with the official answer normalisation, max over gold answers.
"""

from __future__ import annotations

import collections
import json
import re
import string
from itertools import groupby

from loramix.errors import LoramixError
from loramix.tasks.base import DataSource, Example, HubData, Task, require_file

TEST_EVERY = 4
HUB = ("rajpurkar/squad", "plain_text")


def is_test_article(index: int) -> bool:
    return index % TEST_EVERY == TEST_EVERY - 1


def render_prompt(context: str, question: str) -> str:
    return f"Context:\n{context}\n\nQuestion: {question}\n\nAnswer:"


def articles_from_rows(rows: list[dict]) -> list[dict]:
    """The Hub's flat rows (one per question, in file order) back in the v1.1 file's nested shape."""
    articles = []
    for title, by_title in groupby(rows, key=lambda row: row["title"]):
        paragraphs = []
        for context, by_context in groupby(by_title, key=lambda row: row["context"]):
            qas = [
                {"id": r["id"], "question": r["question"], "answers": [{"text": t} for t in r["answers"]["text"]]}
                for r in by_context
            ]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": title, "paragraphs": paragraphs})
    return articles


def dev_articles(source: DataSource) -> list[dict]:
    if isinstance(source, HubData):
        return articles_from_rows(source.rows(*HUB, "validation"))
    path = require_file(source / "squad_v1.1" / "dev-v1.1.json", "SQuAD v1.1 dev file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise LoramixError(f"{path} is not a SQuAD v1.1 file ({exc}).") from exc


def load(source: DataSource, split: str) -> list[Example]:
    if isinstance(source, HubData) and split == "train":
        articles = articles_from_rows(source.rows(*HUB, "train"))
    else:
        wanted = split == "test"
        articles = [a for index, a in enumerate(dev_articles(source)) if is_test_article(index) == wanted]
    examples = []
    for article in articles:
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


def normalise_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    predicted, truth = normalise_answer(prediction).split(), normalise_answer(gold).split()
    common = collections.Counter(predicted) & collections.Counter(truth)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(truth)
    return 2 * precision * recall / (precision + recall)


def score_squad(prediction: str, example: Example) -> dict[str, float]:
    golds = example.references
    return {
        "exact_match": max(float(normalise_answer(prediction) == normalise_answer(g)) for g in golds),
        "f1": max(squad_f1(prediction, g) for g in golds),
    }


TASK = Task(
    name="squad",
    title="SQuAD v1.1",
    loader=load,
    scorer=score_squad,
    primary_metric="f1",
    splits=("train", "test"),
    max_new_tokens=32,
    stop=("\n",),
    offline_data="squad v1.1 dev split by article (train: 36 articles, test: 12)",
    hub_data="rajpurkar/squad (train: the real train split; test: the same 12 dev articles)",
)
