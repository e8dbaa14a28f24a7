"""What every task provides: examples rendered with the paper's templates, split by a fixed rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loramix.errors import LoramixError
from loramix.hub import HubData

DataSource = Path | HubData  # a task data folder, or the Hugging Face Hub (`loramix.hub`)


@dataclass(frozen=True)
class Example:
    """One task item. `prompt` ends with `Answer:`; the training text is `prompt + " " + target`."""

    id: str
    prompt: str
    target: str
    references: tuple[str, ...] = ()  # gold answers used for scoring
    choices: tuple[str, ...] = ()  # option labels (ARC), empty for free-form tasks
    separator: str = " "  # between prompt and target (code completion continues the prompt directly)

    @property
    def answer_text(self) -> str:
        """What follows the prompt in training (and in gold-answer scoring): the separator, then the target."""
        return f"{self.separator}{self.target}"

    @property
    def training_text(self) -> str:
        return self.prompt + self.answer_text


VALIDATION_SIZE = 300  # items held out of the training split for choosing router settings
VALIDATION_SEED = 0  # the seed experts are trained with: they sample from the front of this order


def held_out_of_train(train: list[Example]) -> list[Example]:
    """The validation split of a task without one: the LAST items of train in the seeded order that training
    samples its examples from the front of (`select_examples`, seed 0), so no expert trained with seed 0 and
    --max-examples <= len(train) - 300 has seen them. The centroids are built from all of train, so each of these
    items is one of the thousands of texts averaged into its task's centroid."""
    import random

    order = list(range(len(train)))
    random.Random(VALIDATION_SEED).shuffle(order)
    return [train[i] for i in sorted(order[-VALIDATION_SIZE:])]


@dataclass(frozen=True)
class Task:
    """A task: how to load a split, and how much text a good answer needs when generating.

    Every task has `validation`: its own held-out split where it has one (ARC's Dev), else the tail of train
    (`held_out_of_train`). Router settings are chosen there; `test` is scored once per finalist."""

    name: str
    title: str
    loader: Callable[[DataSource, str], list[Example]]
    splits: tuple[str, ...]
    max_new_tokens: int  # generation budget that fits the task's answers
    stop: tuple[str, ...] = field(default=())  # text after which an answer is complete
    scorer: Callable[[str, Example], dict[str, float]] | None = None  # prediction, item -> {metric: [0, 1]}
    primary_metric: str = ""  # the metric tables and claims rank by
    # option labels whose log-probability as the first answer token picks an answer too (ARC's letters)
    answer_letters: tuple[str, ...] = ()
    offline_data: str = ""  # what the data folder holds for this task
    hub_data: str = ""  # the Hub dataset it loads instead with --data-dir hub
    held_out: bool = False  # no expert was trained for it (BIG-Bench Hard, HumanEval)

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return self.scorer(prediction, example)

    def data_name(self, source: DataSource) -> str:
        """Which data a split comes from, named in every result so data of the two origins never mix."""
        return f"hub {self.hub_data}" if isinstance(source, HubData) else self.offline_data

    def load(self, data_dir: DataSource, split: str) -> list[Example]:
        splits = self.splits if "validation" in self.splits else (*self.splits, "validation")
        if split not in splits:
            raise LoramixError(f"Task '{self.name}' has no split '{split}'; choose one of {', '.join(splits)}.")
        if split == "validation" and "validation" not in self.splits:
            return held_out_of_train(self.loader(data_dir, "train"))
        return self.loader(data_dir, split)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise LoramixError(
            f"{what} not found at {path}. Point --data-dir (or LORAMIX_DATA) at the folder that holds the "
            "task data (see README, 'Data')."
        )
    return path


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LoramixError(f"{path}:{line_number} is not valid JSON ({exc.msg}).") from exc
    return rows
