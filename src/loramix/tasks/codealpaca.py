"""CodeAlpaca instructions: `{instruction}\nInput: {input}\n\nAnswer: {output}` (no Input line when empty).

The 20k set is not available offline; the 2k file from the same repository stands in. From the Hub
(`--data-dir hub`) the 20k set is used, its items named codealpaca20k/N so the two never mix. Either is split
90/10: indices shuffled with random.Random(0), the first 90% train, the rest test.

Scored by ROUGE-L F1 (rouge-score), chrF and sentence BLEU (sacrebleu), each scaled to [0, 1]: surface-overlap
metrics, since the data has no tests, so no execution-based metric is possible.
"""

from __future__ import annotations

import json
import random

from loramix.errors import LoramixError
from loramix.tasks.base import DataSource, Example, HubData, Task, require_file

SPLIT_SEED = 0
TRAIN_FRACTION = 0.9


def render_prompt(instruction: str, input_text: str) -> str:
    if input_text.strip():
        return f"{instruction}\nInput: {input_text}\n\nAnswer:"
    return f"{instruction}\n\nAnswer:"


def split_indices(count: int, split: str) -> list[int]:
    order = list(range(count))
    random.Random(SPLIT_SEED).shuffle(order)
    cut = int(count * TRAIN_FRACTION)
    return sorted(order[:cut] if split == "train" else order[cut:])


def all_rows(source: DataSource) -> tuple[str, list[dict]]:
    """(id prefix, every row) of the 2k file, or of the Hub's 20k set."""
    if isinstance(source, HubData):
        return "codealpaca20k", source.rows("sahil2801/CodeAlpaca-20k", None, "train")
    path = require_file(source / "codealpaca" / "code_alpaca_2k.json", "CodeAlpaca file")
    try:
        return "codealpaca", json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoramixError(f"{path} is not valid JSON ({exc.msg}).") from exc


def load(source: DataSource, split: str) -> list[Example]:
    prefix, rows = all_rows(source)
    return [
        Example(
            id=f"{prefix}/{index}",
            prompt=render_prompt(rows[index]["instruction"], rows[index].get("input", "")),
            target=rows[index]["output"],
            references=(rows[index]["output"],),
        )
        for index in split_indices(len(rows), split)
    ]


_ROUGE = None


def _rouge_scorer():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE


def score_codealpaca(prediction: str, example: Example) -> dict[str, float]:
    from sacrebleu.metrics import BLEU, CHRF

    reference = example.references[0]
    scores = {
        "rougeL": _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure,
        "chrf": CHRF().sentence_score(prediction, [reference]).score / 100.0,
        "bleu": BLEU(effective_order=True).sentence_score(prediction, [reference]).score / 100.0,
    }
    return {name: min(1.0, float(value)) for name, value in scores.items()}  # sacrebleu can round past 100


TASK = Task(
    name="codealpaca",
    title="CodeAlpaca",
    loader=load,
    scorer=score_codealpaca,
    primary_metric="rougeL",
    splits=("train", "test"),
    max_new_tokens=192,
    stop=("\n\n\n",),
    offline_data="CodeAlpaca 2k, 90/10",
    hub_data="sahil2801/CodeAlpaca-20k, 90/10",
)
