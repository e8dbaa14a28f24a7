"""`loramix demo`: one held-out prompt per task through token-level routing, with the trace shown.

If no trained default bundle exists yet, a quick one is trained into the cache first (small example
budget, a few minutes on a laptop CPU). Its experts are weak: it shows the machinery, not the method's
quality; the trained bundle (see REPRODUCTION.md) is the one to judge by.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from loramix.bundle import BUNDLE_FILE, build_bundle, default_bundle_path, quick_bundle_path
from loramix.paths import data_dir
from loramix.tasks import TASKS
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


def run_demo(bundle: str | Path | None, every_k: int, console: Console, data: str | Path | None = None) -> None:
    from loramix.display import legend, timing_line, trace, weights_summary
    from loramix.generation import MixtureModel

    root = Path(bundle) if bundle else ensure_bundle(console, data)
    mixture = MixtureModel.from_bundle(root)
    console.print(
        f"bundle: {root}  (base {mixture.bundle.base_model}, merge {mixture.merge}, re-route every {every_k} tokens)"
    )
    console.print(legend(mixture.expert_names))
    for task in TASKS.values():
        example = task.load(data_dir(data), "test")[0]
        console.print(Rule(f"{task.title}: held-out item {example.id}"))
        console.print(example.prompt[-600:], style="dim", highlight=False, markup=False)
        result = mixture.generate(
            example.prompt,
            every_k=every_k,
            max_new_tokens=min(task.max_new_tokens, DEMO_MAX_NEW_TOKENS),
            stop=task.stop,
        )
        console.print(trace(result, mixture.tokenizer))
        console.print(f"[dim]reference: {example.target[:200]!r}[/]", highlight=False)
        console.print(weights_summary(result, mixture.expert_names))
        console.print(f"[dim]{timing_line(result)}[/]")
