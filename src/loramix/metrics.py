"""The metrics: one prediction against one task item, each function returning {metric name: value in [0, 1]}.
Each task (`loramix.tasks`) names its scorer and its primary metric.

- GSM8K: exact match of the final number, exactly as lm-evaluation-harness does it: `strict` takes the number
  after `####`, `flexible` the last number anywhere in the output; commas, `$` and one final `.` are dropped from
  both sides, nothing else (so "18.0" does not match "18", as in the harness).
- ARC-Challenge: the option letter generated after `Answer:` (`accuracy`), read only where it stands alone
  ("C", "C.", "(c)", "C) text", "The answer is C"), never the article of "A brick wall"; the log-likelihood
  choice among the item's labels is scored in evaluation, where the model's probabilities are at hand.
- SQuAD v1.1: exact match and token F1 with the official answer normalisation, max over gold answers.
- CodeAlpaca: ROUGE-L F1 (rouge-score), chrF and sentence BLEU (sacrebleu), each scaled to [0, 1]. These are
  surface-overlap metrics: the data has no tests, so no execution-based metric is possible.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: each task imports its scorer from here
    from loramix.tasks import Example

# ---- GSM8K ----

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalise_number(text: str) -> str:
    """lm-evaluation-harness's GSM8K normalisation: '1,234' -> '1234', '$18.' -> '18', '18.0' stays '18.0'."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def gsm8k_strict_answer(prediction: str) -> str | None:
    match = _STRICT.search(prediction)
    return normalise_number(match.group(1)) if match else None


def gsm8k_flexible_answer(prediction: str) -> str | None:
    matches = _FLEXIBLE.findall(prediction)
    if not matches:
        return None
    last = next(group for group in matches[-1] if group)
    return normalise_number(last)


def score_gsm8k(prediction: str, example: Example) -> dict[str, float]:
    gold = normalise_number(example.references[0])
    return {
        "strict": float(gsm8k_strict_answer(prediction) == gold),
        "flexible": float(gsm8k_flexible_answer(prediction) == gold),
    }


# ---- ARC-Challenge ----

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


# ---- SQuAD v1.1 (official evaluation script's normalisation) ----


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


# ---- CodeAlpaca ----

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


def choose_by_loglik(logprobs: Sequence[float], labels: Sequence[str], candidates: Sequence[str]) -> str:
    """The label with the highest log-probability among the item's own labels."""
    allowed = [(logprobs[candidates.index(label)], label) for label in labels if label in candidates]
    return max(allowed)[1]
