"""The four tasks of the paper, by name."""

from __future__ import annotations

from loramix.errors import LoramixError
from loramix.tasks import arc, codealpaca, gsm8k, squad
from loramix.tasks.base import Example, Task

TASKS: dict[str, Task] = {module.TASK.name: module.TASK for module in (gsm8k, arc, squad, codealpaca)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LoramixError(f"Unknown task '{name}'; choose one of {', '.join(TASKS)}.")
    return TASKS[name]


__all__ = ["TASKS", "Example", "Task", "get_task"]
