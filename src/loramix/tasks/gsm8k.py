"""GSM8K grade-school math: `Question: {question}\n\nAnswer: {worked solution ending #### N}`.

Scored by exact match of the final number, exactly as lm-evaluation-harness does it: `strict` takes the number
after `####`, `flexible` the last number anywhere in the output; commas, `$` and one final `.` are dropped from
both sides, nothing else (so "18.0" does not match "18", as in the harness).
"""

from __future__ import annotations

import re

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
