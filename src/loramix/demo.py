"""`loramix demo`: one held-out prompt per task through token-level routing, with the trace shown.

If no trained default bundle exists yet, a quick one is trained into the cache first (small example
budget, a few minutes on a laptop CPU). Its experts are weak: it shows the machinery, not the method's
quality; the trained bundle (see REPRODUCTION.md) is the one to judge by.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from loramix.bundle import BUNDLE_FILE, default_bundle_path, quick_bundle_path
from loramix.bundle_build import build_bundle
from loramix.errors import LoramixError
from loramix.hardware import Placement
from loramix.paths import data_dir
from loramix.router import DEFAULT_ROUTE
from loramix.tasks import TASKS, Example, Task
from loramix.training import TrainConfig, train_expert

QUICK_EXAMPLES = 64  # per expert: enough to move the adapters, small enough for minutes on a CPU
QUICK_ROUTER_EXAMPLES = 500  # per task, for the centroids
DEMO_MAX_NEW_TOKENS = 48


def train_quick_bundle(root: Path, console: Console, data: str | Path | None = None) -> Path:
    """Train one small expert per task and build the router: a working bundle in a few minutes."""
    experts = {task: root / "experts" / task for task in TASKS}
    for number, (task, folder) in enumerate(experts.items(), start=1):
        console.print(f"[bold]training expert {number}/{len(TASKS)}: {task}[/] ({QUICK_EXAMPLES} examples)")
        train_expert(TrainConfig(task=task, max_examples=QUICK_EXAMPLES), folder, data=data)
    console.print("[bold]building the router[/] (embedding each task's training texts)")
    build_bundle(root, experts, data=data, max_examples=QUICK_ROUTER_EXAMPLES, progress=True)
    return root


def ensure_bundle(console: Console, data: str | Path | None = None) -> Path:
    found = default_bundle_path()
    if found is not None:
        return found
    root = quick_bundle_path()
    console.print(
        f"[yellow]No trained default bundle yet: training a quick one into {root} "
        f"({len(TASKS)} experts x {QUICK_EXAMPLES} examples; a few minutes, once).[/]"
    )
    train_quick_bundle(root, console, data)
    assert (root / BUNDLE_FILE).is_file()
    return root


def shipped_examples() -> list[tuple[Task, Example]]:
    """The held-out prompts that ship in the package (examples/prompts.jsonl: one test item per task, each with
    its source and license), for machines without the task data."""
    text = resources.files("loramix").joinpath("examples/prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(TASKS[r["task"]], Example(id=r["id"], prompt=r["prompt"], target=r["target"])) for r in rows]


def demo_examples(data: str | Path | None = None) -> tuple[list[tuple[Task, Example]], str]:
    """One held-out test item per task from the task data; without any data folder, the shipped ones."""
    try:
        root = data_dir(data)
    except LoramixError:
        if data is not None:
            raise  # a folder the user named must exist
        return shipped_examples(), "the example prompts shipped in the package (no task data folder here)"
    return [(task, task.load(root, "test")[0]) for task in TASKS.values()], f"held-out test items from {root}"


def run_demo(
    bundle: str | Path | None,
    every_k: int,
    console: Console,
    data: str | Path | None = None,
    route: str = DEFAULT_ROUTE,
    placement: Placement | None = None,
) -> None:
    from loramix.display import legend, timing_line, trace, weights_summary
    from loramix.generation import MixtureModel

    root = Path(bundle) if bundle else ensure_bundle(console, data)
    device, dtype = (placement or Placement()).resolve()
    mixture = MixtureModel.from_bundle(root, device=device, dtype=dtype)
    schedule = "every token" if every_k == 1 else f"every {every_k} tokens"
    console.print(
        f"bundle: {root}  (base {mixture.bundle.base_model} on {device} in {mixture.placement['dtype']}, "
        f"merge {mixture.merge}, route {route}, re-route {schedule})"
    )
    console.print(legend(mixture.expert_names))
    examples, origin = demo_examples(data)
    console.print(f"[dim]prompts: {origin}[/]")
    for task, example in examples:
        console.print(Rule(f"{task.title}: held-out item {example.id}"))
        console.print(example.prompt[-600:], style="dim", highlight=False, markup=False)
        result = mixture.generate(
            example.prompt,
            every_k=every_k,
            route=route,
            max_new_tokens=min(task.max_new_tokens, DEMO_MAX_NEW_TOKENS),
            stop=task.stop,
        )
        console.print(trace(result, mixture.tokenizer))
        console.print(f"[dim]reference: {example.target[:200]!r}[/]", highlight=False)
        console.print(weights_summary(result, mixture.expert_names))
        console.print(f"[dim]{timing_line(result)}[/]")
