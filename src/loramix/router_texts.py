"""The texts that describe an expert to the router: a built-in task's training items, or a user's own file.

A source is a task name (`gsm8k`, ...) or a file of example prompts:
  .txt    one text per line (blank lines skipped)
  .jsonl  one JSON object per line with a "text" or "prompt" field (or a bare JSON string)
  .csv    a header row with a "text" or "prompt" column

The text centroid (MiniLM) of a task is built from its whole training texts (prompt + answer), as the paper does;
the hidden-state centroid from the prompts alone (what routing sees first; see ROUTING.md). A file gives the same
texts to both.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from loramix.errors import LoramixError
from loramix.paths import data_dir
from loramix.tasks import TASKS, get_task

TEXT_FIELDS = ("text", "prompt")
FILE_SUFFIXES = (".txt", ".jsonl", ".csv")
HIDDEN_EXAMPLES = 300  # prompts per expert for the hidden-state centroid: enough, and about a minute on a CPU


@dataclass(frozen=True)
class RouterTexts:
    source: str  # the task name, or the file as given
    task: str | None  # the task, when the source is one
    for_text_router: list[str]  # whole training texts (task) or the file's texts
    for_hidden_router: list[str]  # prompts (task) or the file's texts


def load_router_texts(source: str, data: str | Path | None = None, max_examples: int | None = None) -> RouterTexts:
    """The texts of one source (a task name or a file), the first `max_examples` of them."""
    if source in TASKS:
        examples = get_task(source).load(data_dir(data), "train")[:max_examples]
        prompts = [x.prompt for x in examples]
        return RouterTexts(source, source, [x.training_text for x in examples], prompts)
    path = Path(source).expanduser()
    if not path.is_file():
        raise LoramixError(
            f"Router texts '{source}' are neither a task ({', '.join(TASKS)}) nor a file. Give a .txt, .jsonl or "
            ".csv file of example prompts for this expert."
        )
    texts = read_text_file(path)[:max_examples]
    return RouterTexts(source, None, texts, texts)


def read_text_file(path: Path) -> list[str]:
    """Example texts from a .txt, .jsonl or .csv file; refuses an empty file or one without a text field."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise LoramixError(
            f"{path}: router texts must be a {', '.join(FILE_SUFFIXES)} file, not '{suffix or path.name}'."
        )
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoramixError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from exc
    if suffix == ".txt":
        texts = [line.strip() for line in content.splitlines()]
    elif suffix == ".jsonl":
        texts = [_jsonl_text(path, n, line) for n, line in enumerate(content.splitlines(), start=1) if line.strip()]
    else:
        texts = _csv_texts(path, content)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LoramixError(f"{path} holds no texts; give at least one example prompt for this expert.")
    return texts


def _jsonl_text(path: Path, line_number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LoramixError(f"{path}:{line_number} is not valid JSON ({exc.msg}).") from exc
    if isinstance(row, str):
        return row
    for name in TEXT_FIELDS:
        if isinstance(row, dict) and isinstance(row.get(name), str):
            return row[name]
    raise LoramixError(f'{path}:{line_number} has no text: give each line a "text" or "prompt" field.')


def _csv_texts(path: Path, content: str) -> list[str]:
    reader = csv.DictReader(content.splitlines())
    column = next((name for name in TEXT_FIELDS if name in (reader.fieldnames or [])), None)
    if column is None:
        raise LoramixError(
            f"{path}: the header row ({', '.join(reader.fieldnames or []) or 'empty'}) has no 'text' or 'prompt' "
            "column; name the column of example prompts 'text'."
        )
    return [row[column] or "" for row in reader]
