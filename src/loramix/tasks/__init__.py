"""Tasks by name: the paper's four (each with its expert), and held-out tasks no expert was trained for."""

from __future__ import annotations

from loramix.errors import LoramixError
from loramix.tasks import arc, bbh, codealpaca, gsm8k, humaneval, squad
from loramix.tasks.base import Example, Task

TASKS: dict[str, Task] = {module.TASK.name: module.TASK for module in (gsm8k, arc, squad, codealpaca)}
HELD_OUT_TASKS: dict[str, Task] = {task.name: task for task in (*bbh.TASKS, humaneval.TASK)}
ALL_TASKS: dict[str, Task] = {**TASKS, **HELD_OUT_TASKS}
# names that stand for several tasks in --tasks
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "trained": tuple(TASKS),
    "bbh": tuple(task.name for task in bbh.TASKS),
    "held-out": tuple(HELD_OUT_TASKS),
}


def get_task(name: str) -> Task:
    if name not in ALL_TASKS:
        raise LoramixError(
            f"Unknown task '{name}'; choose from {', '.join(TASKS)}, humaneval, bbh_<name> ({len(bbh.TASKS)} BIG-Bench "
            f"Hard tasks), or a group: {', '.join(TASK_GROUPS)}."
        )
    return ALL_TASKS[name]


def parse_tasks(spec: str) -> tuple[str, ...]:
    """A comma-separated --tasks value, groups expanded, each task checked, in order without repeats."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            names += TASK_GROUPS.get(part, (part,))
    for name in names:
        get_task(name)
    if not names:
        raise LoramixError("--tasks names no task.")
    return tuple(dict.fromkeys(names))


__all__ = ["ALL_TASKS", "HELD_OUT_TASKS", "TASKS", "TASK_GROUPS", "Example", "Task", "get_task", "parse_tasks"]
