"""Each task's scorer against hand-worked examples, including the tricky normalisation cases."""

from __future__ import annotations

import pytest

from loramix.tasks import Example
from loramix.tasks.arc import arc_letter, choose_by_loglik, score_arc
from loramix.tasks.codealpaca import score_codealpaca
from loramix.tasks.gsm8k import gsm8k_flexible_answer, gsm8k_strict_answer, normalise_number, score_gsm8k
from loramix.tasks.squad import normalise_answer, score_squad, squad_f1


def item(*references, choices=()):
    return Example(id="x", prompt="p", target=references[0], references=references, choices=choices)


@pytest.mark.parametrize(
    "raw,normal",
    [("1,234", "1234"), ("$18", "18"), ("18.", "18"), ("18.0", "18.0"), ("-3.50", "-3.50"), ("0.25", "0.25"),
     ("18..", "18.")],
)  # fmt: skip
def test_number_normalisation(raw, normal):
    assert normalise_number(raw) == normal


@pytest.mark.parametrize(
    "prediction,strict,flexible",
    [
        ("She makes 9 * 2 = $18 a day.\n#### 18", 1.0, 1.0),
        ("#### 1,800", 0.0, 0.0),  # right format, wrong number
        ("So she earns $18.", 0.0, 1.0),  # no ####: strict fails, the last number is right
        ("#### 18\nThen 20 more", 1.0, 0.0),  # strict reads ####; flexible takes the LAST number
        ("18.0 dollars", 0.0, 0.0),  # as lm-evaluation-harness: only commas, $ and one final . are dropped
        ("It is 18.", 0.0, 1.0),
        ("no number here", 0.0, 0.0),
    ],
)
def test_gsm8k_strict_and_flexible(prediction, strict, flexible):
    assert score_gsm8k(prediction, item("18")) == {"strict": strict, "flexible": flexible}


def test_gsm8k_extractors():
    assert gsm8k_strict_answer("x #### -7") == "-7"
    assert gsm8k_flexible_answer("costs $1,234.50 total") == "1234.50"
    assert gsm8k_strict_answer("no marker 5") is None


@pytest.mark.parametrize(
    "prediction,letter",
    [
        (" C", "C"),
        ("C.", "C"),
        ("(c)", "C"),
        ("C) Planetary days", "C"),
        ("The answer is D", "D"),
        (" Cat", None),
        ("", None),
        (" A brick wall", None),  # the article, not option A
        ("A", "A"),
        ("B\nBecause plants need it", "B"),
        ("E: rust", "E"),
        ("D ", "D"),
        ("a brick", None),
    ],
)
def test_arc_letter(prediction, letter):
    assert arc_letter(prediction) == letter


def test_arc_scores_and_loglik_choice():
    example = item("B", choices=("A", "B", "C", "D"))
    assert score_arc(" B", example) == {"accuracy": 1.0}
    assert score_arc(" A. oxygen", example) == {"accuracy": 0.0}
    # E has the highest log-probability but is not one of this item's labels
    assert choose_by_loglik([-3.0, -1.0, -2.0, -4.0, -0.1], ("A", "B", "C", "D"), ("A", "B", "C", "D", "E")) == "B"


def test_squad_official_normalisation():
    assert normalise_answer("The  Denver Broncos!") == "denver broncos"
    assert normalise_answer("an Apple, a day") == "apple day"
    scores = score_squad("Denver Broncos.", item("the Broncos", "Denver Broncos"))
    assert scores == {"exact_match": 1.0, "f1": 1.0}
    # F1 with partial overlap: prediction 'broncos of denver' vs gold 'denver broncos' -> P=2/3, R=1
    assert squad_f1("broncos of denver", "Denver Broncos") == pytest.approx(0.8)
    assert score_squad("Carolina", item("Denver Broncos")) == {"exact_match": 0.0, "f1": 0.0}


def test_codealpaca_overlap_metrics():
    reference = "def add(a, b):\n    return a + b"
    perfect = score_codealpaca(reference, item(reference))
    assert perfect == {"rougeL": 1.0, "chrf": 1.0, "bleu": 1.0}
    partial = score_codealpaca("def add(x, y):\n    return x + y", item(reference))
    assert 0.0 < partial["rougeL"] < 1.0 and 0.0 < partial["chrf"] < 1.0
    assert score_codealpaca("", item(reference)) == {"rougeL": 0.0, "chrf": 0.0, "bleu": 0.0}
