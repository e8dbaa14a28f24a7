"""What every task provides: examples rendered with the paper's templates, split by a fixed rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loramix.errors import LoramixError


@dataclass(frozen=True)
class Example:
    """One task item. `prompt` ends with `Answer:`; the training text is `prompt + " " + target`."""

    id: str
    prompt: str
    target: str
    references: tuple[str, ...] = ()  # gold answers used for scoring
    choices: tuple[str, ...] = ()  # option labels (ARC), empty for free-form tasks

    @property
    def training_text(self) -> str:
        return f"{self.prompt} {self.target}"


@dataclass(frozen=True)
class Task:
    """A task: how to load a split, and how much text a good answer needs when generating."""

    name: str
    title: str
    loader: Callable[[Path, str], list[Example]]
    splits: tuple[str, ...]
    max_new_tokens: int  # generation budget that fits the task's answers
    stop: tuple[str, ...] = field(default=())  # text after which an answer is complete

    def load(self, data_dir: Path, split: str) -> list[Example]:
        if split not in self.splits:
            raise LoramixError(f"Task '{self.name}' has no split '{split}'; choose one of {', '.join(self.splits)}.")
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
