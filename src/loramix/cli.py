"""The `loramix` command line: a thin layer over the library; errors print as one clear line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loramix.bench.harness import BenchOptions
from loramix.bundle_build import name_value_pairs
from loramix.display import loss_table, rescore_table, results_table
from loramix.errors import LoramixError
from loramix.evaluation import EvalPlan
from loramix.hardware import Placement
from loramix.loadtest import LoadtestOptions
from loramix.models import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER
from loramix.options import options_from_values, takes_options
from loramix.ray_serve import RaySettings
from loramix.router import DEFAULT_EVERY_K, DEFAULT_ROUTE, ROUTE_HELP
from loramix.sequences import GenerationOptions
from loramix.server import ServeSettings
from loramix.specialist import SpecialistPlan
from loramix.system import quiet_libraries
from loramix.training import TrainConfig

app = typer.Typer(
    help="Token-level adaptation of LoRA adapters: train experts, build the router, generate with per-token routing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
router_app = typer.Typer(help="Build the centroid router of a bundle.", no_args_is_help=True)
app.add_typer(router_app, name="router")
bundle_app = typer.Typer(help="List, add or remove a bundle's experts.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")

# soft_wrap: a message is never broken mid-phrase at the terminal's width (a long path would split it); the
# terminal wraps it, and a non-tty reader (a pipe, a log, CI) sees one line. Tables still fit the width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Task data folder (default: $LORAMIX_DATA, else ../shared/data).")
]
EmbedderDtype = Annotated[
    str,
    typer.Option(
        help="Router embedder precision: fp32 (exact), bf16 (~1.8x cheaper routing on CPUs with AVX512-BF16), "
        "auto (bf16 on such CPUs, else fp32)."
    ),
]
BundleDir = Annotated[
    Path | None, typer.Option("--bundle", help="Bundle folder (default: the trained default bundle).")
]


@app.callback()
def _every_command() -> None:
    quiet_libraries()  # before any command, also when the app is invoked in-process (tests, notebooks)


def _train_config(values: dict) -> TrainConfig:
    return options_from_values(TrainConfig, values, base=TrainConfig(task=values["task"]))


@app.command()
@takes_options(TrainConfig, make=_train_config)
def train(
    task: Annotated[str, typer.Argument(help="gsm8k, arc, squad or codealpaca")],
    out: Annotated[Path, typer.Option("--out", help="Adapter folder to write (a standard PEFT adapter).")],
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(help="Retrain even if OUT holds an expert or other checkpoints.")] = False,
    options: TrainConfig = None,
) -> None:
    """Train one LoRA expert on one task (resumes if interrupted)."""
    from loramix.training import train_expert

    metadata = train_expert(options, out, data=data_dir, force=force)
    console.print(
        f"[green]expert '{task}' saved to {out}[/]: {metadata['examples']} examples, {metadata['steps']} steps, "
        f"loss {metadata['train_loss']}, {metadata['train_seconds']}s"
    )


Experts = Annotated[
    list[str],
    typer.Option("--expert", help="NAME=ADAPTER (PEFT LoRA folder or Hub id), repeatable (default: BUNDLE/experts/*)."),
]
Texts = Annotated[
    list[str],
    typer.Option(
        "--texts",
        help="NAME=SOURCE, repeatable: the texts that describe expert NAME to the router, a task "
        "(gsm8k, arc, squad, codealpaca) or a .jsonl/.txt/.csv file of example prompts (default: its task).",
    ),
]
MaxExamples = Annotated[int | None, typer.Option(help="Texts per expert for its centroid (default all).")]


@router_app.command("build")
@takes_options(Placement, name="placement")
def router_build(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder to create or refresh.")],
    expert: Experts = [],  # noqa: B006 - typer reads the default, never mutates it
    texts: Texts = [],  # noqa: B006
    base: Annotated[str, typer.Option(help="Base model the experts were trained on.")] = DEFAULT_BASE_MODEL,
    embedder: Annotated[str, typer.Option(help="Sentence embedder for routing.")] = DEFAULT_EMBEDDER,
    max_examples: MaxExamples = None,
    data_dir: DataDir = None,
    placement: Placement = None,
) -> None:
    """Build both routers (text centroids and hidden-state centroids) from each expert's texts; write bundle.json."""
    from loramix.bundle_build import build_bundle

    experts = name_value_pairs(expert, "--expert", "DIR") or None
    result = build_bundle(
        bundle, experts, base_model=base, embedder=embedder, data=data_dir, max_examples=max_examples,
        progress=True, texts=name_value_pairs(texts, "--texts", "SOURCE"), placement=placement,
    )  # fmt: skip
    counts = ", ".join(f"{k}: {v}" for k, v in result.info["router_examples"].items())
    console.print(f"[green]bundle written to {bundle}[/] (experts {', '.join(result.expert_names)}; texts {counts})")


@router_app.command("hidden")
@takes_options(Placement, name="placement")
def router_hidden(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder to add hidden-state centroids to.")],
    max_examples: Annotated[int, typer.Option(help="Training texts per expert.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 8,
    texts: Annotated[str, typer.Option(help="prompts (the items' prompts alone) or training (prompt + answer).")] = (
        "prompts"
    ),
    data_dir: DataDir = None,
    placement: Placement = None,
) -> None:
    """Centroids of the base model's own hidden states (every layer), for `--route hidden:L/RULE`."""
    from loramix.bundle_build import build_hidden_router

    path = build_hidden_router(bundle, max_examples, data_dir, batch_size, texts, placement)
    console.print(f"[green]hidden-state centroids written to {path}[/]")


BundleArg = Annotated[Path, typer.Argument(help="Bundle folder.")]


@bundle_app.command("list")
def bundle_list(
    bundle: BundleArg, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False
) -> None:
    """The bundle's experts: their router texts, rank, alpha, scaling and adapted modules."""
    from loramix.bundle import Bundle
    from loramix.bundle_build import describe_experts
    from loramix.display import bundle_table

    rows = describe_experts(bundle)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    loaded = Bundle.load(bundle)
    console.print(bundle_table(f"{bundle}: base {loaded.base_model}, embedder {Path(loaded.embedder).name}", rows))


@bundle_app.command("add")
@takes_options(Placement, name="placement")
def bundle_add(
    bundle: BundleArg,
    expert: Annotated[str, typer.Option("--expert", help="NAME=ADAPTER: the PEFT LoRA folder (or Hub id) to add.")],
    texts: Annotated[
        str | None, typer.Option(help="A task or a .jsonl/.txt/.csv file of example prompts (default: its task).")
    ] = None,
    max_examples: MaxExamples = None,
    data_dir: DataDir = None,
    placement: Placement = None,
) -> None:
    """Add one expert; only its own router rows are built, the others' are kept."""
    from loramix.bundle_build import add_expert

    ((name, adapter),) = name_value_pairs([expert], "--expert", "DIR").items()
    result = add_expert(bundle, name, adapter, texts, data_dir, max_examples, placement)
    console.print(f"[green]added '{name}' to {bundle}[/] (experts {', '.join(result.expert_names)})")


@bundle_app.command("remove")
def bundle_remove(bundle: BundleArg, name: Annotated[str, typer.Argument(help="The expert to remove.")]) -> None:
    """Remove one expert (its folder and router rows); the others' rows are kept."""
    from loramix.bundle_build import remove_expert

    result = remove_expert(bundle, name)
    console.print(f"[green]removed '{name}' from {bundle}[/] (experts {', '.join(result.expert_names)})")


@app.command()
@takes_options(Placement, name="placement")
@takes_options(GenerationOptions)
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts ('-' reads one from stdin).")],
    bundle: BundleDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
    show_trace: Annotated[
        bool, typer.Option("--trace", help="Colour tokens by dominant expert; show weights.")
    ] = False,
    embedder_dtype: EmbedderDtype = "auto",
    options: GenerationOptions = None,
    placement: Placement = None,
) -> None:
    """Generate with token-level routing."""
    from loramix.display import show_results, show_stream
    from loramix.generation import MixtureModel

    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    options.validate()
    device, dtype = placement.resolve()
    mixture = MixtureModel.from_bundle(bundle, embedder_dtype=embedder_dtype, device=device, dtype=dtype)
    if as_json:
        for result in mixture.generate(prompts, options):
            print(json.dumps(result.to_json(mixture.expert_names), ensure_ascii=False))
    elif len(prompts) > 1:
        show_results(console, mixture.generate(prompts, options), mixture, show_trace)
    else:  # one prompt: its tokens as they arrive
        show_stream(console, mixture.stream(prompts[0], options), mixture.expert_names, show_trace)


@app.command("eval")
@takes_options(EvalPlan, name="plan")
def evaluate(
    report_only: Annotated[bool, typer.Option(help="Only rewrite the report from the items already scored.")] = False,
    rescore: Annotated[
        bool, typer.Option(help="Score the stored predictions again with today's metrics (no generation), then report.")
    ] = False,
    plan: EvalPlan = None,
) -> None:
    """The paper's comparison with bootstrap CIs (and gold-answer loss with --loss); re-running resumes."""
    from loramix.evaluation import distributed_rank, run_evaluation
    from loramix.evaluation import rescore as rescore_stored
    from loramix.report import report_meta, write_report
    from loramix.specialist import run_answer_losses

    if rescore:
        console.print(rescore_table(rescore_stored(plan.out, plan.data, plan.split)))
        report_only = True
    plan.task_names()  # refuse unknown tasks before anything runs
    rank, world = distributed_rank()
    if not report_only:
        if plan.generation:
            store = run_evaluation(plan, progress=rank == 0)
            if store.dropped:
                err_console.print(f"[yellow]{store.dropped} unreadable result line(s) were dropped and redone.[/]")
        if plan.loss and rank == 0:
            run_answer_losses(plan)
        if world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
    if rank != 0:
        return
    results = write_report(plan.out, report_meta(plan.bundle, plan.split))
    if not results:
        raise LoramixError(f"No scored items in {plan.out} yet.")
    if results.get("table"):
        table, claims = results_table(results)
        console.print(table)
        for claim in claims:
            console.print(claim)
    if results.get("answer_loss"):
        console.print(loss_table(results["answer_loss"]))
    console.print(f"[green]report written to {plan.out / 'results.md'}[/]")


@app.command()
@takes_options(SpecialistPlan, name="plan")
def specialist(plan: SpecialistPlan = None) -> None:
    """Gold-answer loss of the base model and of each expert alone on every task (the specialist matrix by
    teacher forcing); resumable, and added to the eval report in the same folder."""
    from loramix.report import report_meta, write_report
    from loramix.specialist import run_specialist

    store = run_specialist(plan)
    if store.dropped:
        err_console.print(f"[yellow]{store.dropped} unreadable line(s) were dropped and redone.[/]")
    results = write_report(plan.out, report_meta(plan.bundle, plan.split))
    console.print(loss_table(results["answer_loss"]))
    console.print(f"[green]report written to {plan.out / 'results.md'}[/]")


@app.command()
@takes_options(BenchOptions)
def bench(options: BenchOptions = None) -> None:
    """Speed against the reference loop, PEFT alternatives and plain decoding."""
    from loramix.bench import keep_other_machines, run_benchmark, write_report_files

    o = options
    report = run_benchmark(
        o.out, quick=o.quick, bundle=o.bundle, data=o.data, tokens=o.tokens or None, batches=o.batches or None,
        repeats=o.repeats, with_merge_grid=o.merge_grid, progress=lambda line: console.print(line, highlight=False),
        placement=o,
    )  # fmt: skip
    text, plot = write_report_files(report, o.out, "loramix " + " ".join(sys.argv[1:]))
    if o.markdown is not None:
        if plot:
            import shutil

            shutil.copy(o.out / plot, o.markdown.parent / plot)
        o.markdown.write_text(keep_other_machines(o.markdown, text), encoding="utf-8")
    console.print(f"[green]benchmark written to {o.out / 'bench.md'}[/]")


@app.command()
@takes_options(RaySettings, name="ray_settings")
@takes_options(ServeSettings, name="settings")
def serve(
    ray: Annotated[
        bool, typer.Option("--ray", help="Serve as a Ray Serve deployment (pip install 'loramix[ray]').")
    ] = False,
    settings: ServeSettings = None,
    ray_settings: RaySettings = None,
) -> None:
    """An OpenAI-compatible server with continuous batching and a live routing view at http://HOST:PORT/."""
    from dataclasses import replace

    from loramix.bundle import Bundle, resolve_bundle
    from loramix.server import serve as run_server

    settings = replace(settings, api_key=settings.api_key or os.environ.get("LORAMIX_API_KEY"))
    settings.check(Bundle.load(resolve_bundle(settings.bundle)).expert_names)  # before minutes of loading
    where = f"[bold]http://{settings.host}:{settings.port}/[/] (the routing view; the API under /v1)"
    if not ray:
        console.print(f"loramix serving on {where}")
        run_server(settings)
        return
    from loramix.ray_serve import serve_on_ray

    ray_settings.check()
    try:
        import ray as _  # noqa: F401
    except ImportError:
        raise LoramixError("--ray needs Ray Serve: pip install 'loramix[ray]'.") from None
    r = ray_settings
    shape = f"autoscaled {r.autoscale}" if r.autoscale else f"{r.replicas} replica(s)"
    console.print(f"starting Ray Serve ({shape}, {r.num_cpus} CPU / {r.num_gpus} GPU each)...")
    serve_on_ray(settings, ray_settings, on_ready=lambda: console.print(f"loramix serving on Ray at {where}"))


@app.command()
@takes_options(LoadtestOptions)
def loadtest(options: LoadtestOptions = None) -> None:
    """Concurrent streaming clients against a running server (loopback only): tokens/s, TTFT, inter-token latency;
    or a long prompt arriving beside running streams; or every client asking for its own mixture."""
    from loramix.loadtest import TABLE_HEADER, expert_count, long_prompt_line, run_loadtest, run_long_prompt

    levels = options.levels()
    if options.scenario == "long-prompt":
        report = run_long_prompt(
            options.url, levels[0], options.max_tokens, options.long_tokens, api_key=options.api_key,
            model=options.model, extra=options.extra(),
        )  # fmt: skip
        console.print(long_prompt_line(report), highlight=False)
    else:
        mixtures = None
        if options.scenario == "mixtures":
            mixtures = (expert_count(options.url, options.api_key, options.flavour), options.flavour)
        console.print(TABLE_HEADER, highlight=False)
        report = run_loadtest(
            options.url, levels, options.requests, options.max_tokens, api_key=options.api_key,
            extra=options.extra(), progress=lambda row: console.print(row, highlight=False), model=options.model,
            mixtures=mixtures,
        )  # fmt: skip
    if options.out is not None:
        out = Path(options.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        console.print(f"[green]report written to {out}[/]")


@app.command()
@takes_options(Placement, name="placement")
def demo(
    bundle: BundleDir = None,
    every_k: Annotated[int, typer.Option("--every-k", help="Re-route every k generated tokens.")] = DEFAULT_EVERY_K,
    route: Annotated[str, typer.Option(help=ROUTE_HELP)] = DEFAULT_ROUTE,
    data_dir: DataDir = None,
    placement: Placement = None,
) -> None:
    """One held-out prompt per task through token-level routing, with the trace."""
    from loramix.demo import run_demo

    run_demo(bundle, every_k, console, data_dir, route=route, placement=placement)


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Versions and where things are: cache, default bundle, base model, embedder, data, auto device and dtype."""
    from loramix.system import installation_report

    report = installation_report()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        console.print(f"[bold]{key:>22}[/]  {value}", highlight=False)


def main() -> None:
    quiet_libraries()
    try:
        app()
    except LoramixError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: finished work is kept; re-run the same command to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
