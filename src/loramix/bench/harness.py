"""The measuring harness: every method timed round-robin on each (tokens, batch) cell, memory sampled, medians
taken, outputs that must agree compared, and the grid written to bench.json as it grows."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loramix.bench.methods import PER_SEQUENCE, SLOW_AT_BATCH, BenchContext, Run, merge_grid, method_table
from loramix.hardware import Placement
from loramix.options import option

QUICK = {"tokens": (32,), "batches": (1, 4), "repeats": 1}


@dataclass(frozen=True)
class BenchOptions(Placement):
    """What `loramix bench` can be told; its flags come from here."""

    out: Path = option(Path("runs/bench"), "Folder for bench.json, bench.md and the plot.")
    bundle: Path | None = option(None, "Bundle folder (default: the trained default bundle).")
    quick: bool = option(False, "A smoke check in minutes (32 tokens, batch 1 and 4).")
    tokens: tuple[int, ...] = option((), "New-token counts, e.g. 32,128,256 (default: 32,128,256).", comma=True)
    batches: tuple[int, ...] = option((), "Batch sizes, e.g. 1,8,16 (default: 1,8,16).", comma=True)
    repeats: int | None = option(None, "Timed repeats per cell, the median reported (default 3).")
    markdown: Path | None = option(None, "Also write the report here (e.g. BENCHMARKS.md).")
    merge_grid: bool | None = option(None, "Also time every decode x k x merge mode at batch 1 (default: full runs).")
    data: Path | None = option(None, "Task data folder (the prompts).", flag="--data-dir")


FULL = {"tokens": (32, 128, 256), "batches": (1, 8, 16), "repeats": 3}
CELL_BUDGET_SECONDS = 60.0  # stop repeating a cell once its repeats have taken this long


@dataclass
class Cell:
    method: str
    tokens: int
    batch: int
    ms_per_step: float
    spread: tuple[float, float]
    tokens_per_second: float
    split_ms: dict[str, float]
    peak_rss_mb: float | None
    repeats: int
    step_ms: list[float] = field(default_factory=list)


class _RssSampler:
    """Peak resident memory (MB) above the level at entry, sampled every 5 ms (Linux /proc)."""

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.005):
            value = self._rss()
            if value is not None and self.peak is not None:
                self.peak = max(self.peak, value)

    @staticmethod
    def _rss() -> float | None:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        import resource

        return pages * resource.getpagesize() / 2**20

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float | None:
        return None if self.start is None else round(self.peak - self.start, 1)


def measure_cell(
    ctx: BenchContext, methods: dict[str, Callable], n: int, batch: int, repeats: int
) -> list[tuple[Cell, Run]]:
    """Time every method on one (tokens, batch) cell, round-robin: each round runs every method once, so a
    machine whose speed drifts (shared hosts do) slows all methods alike instead of whichever ran last."""
    prompts = ctx.prompts(batch)
    for name, function in methods.items():
        function(ctx, prompts[:1] if name in PER_SEQUENCE else prompts, 4)  # warm-up
    runs: dict[str, list[Run]] = {name: [] for name in methods}
    peaks: dict[str, list[float]] = {name: [] for name in methods}
    started = time.perf_counter()
    budget = CELL_BUDGET_SECONDS * len(methods)
    for round_number in range(repeats):
        if round_number and time.perf_counter() - started > budget:
            break
        for name, function in methods.items():
            with _RssSampler() as rss:
                runs[name].append(function(ctx, prompts, n))
            if rss.peak_mb is not None:
                peaks[name].append(rss.peak_mb)
    return [(_summarise(name, runs[name], n, batch, peaks[name]), _middle(runs[name])) for name in methods]


def _middle(runs: list[Run]) -> Run:
    per_step = [r.seconds / r.steps for r in runs]
    return runs[per_step.index(statistics.median_low(per_step))]


def _summarise(method: str, runs: list[Run], n: int, batch: int, peaks: list[float]) -> Cell:
    per_step = [1000 * r.seconds / r.steps for r in runs]
    middle = _middle(runs)
    return Cell(
        method=method,
        tokens=n,
        batch=batch,
        ms_per_step=round(statistics.median(per_step), 2),
        spread=(round(min(per_step), 2), round(max(per_step), 2)),
        tokens_per_second=round(batch * n / statistics.median(r.seconds for r in runs), 2),
        split_ms={part: round(1000 * seconds / middle.steps, 2) for part, seconds in middle.split.items()},
        peak_rss_mb=max(peaks) if peaks else None,
        repeats=len(runs),
        step_ms=[round(1000 * s, 2) for s in middle.step_seconds] if batch == 1 else [],
    )


@dataclass
class Agreement:
    check: str
    same_tokens: bool
    detail: str


def agreements(runs: dict[tuple[str, int, int], Run]) -> list[Agreement]:
    checks = [
        ("ours recompute k=1 linear", "reference", "recompute at k=1 (PEFT linear merge) = the reference loop"),
        ("ours cached k=1", "peft-scales k=1", "cached exact at k=1 = PEFT with per-adapter scales and a KV cache"),
        ("ours-base", "base", "our loop with the experts off = HF generate on the base model"),
    ]
    found = []
    for ours, theirs, text in checks:
        for (method, n, batch), run in runs.items():
            if method == ours and (theirs, n, batch) in runs:
                other = runs[(theirs, n, batch)]
                same = run.tokens[: len(other.tokens)] == other.tokens
                found.append(Agreement(text, same, f"{n} tokens, batch {batch}"))
    return found


def run_benchmark(
    out: Path,
    quick: bool = False,
    bundle: str | Path | None = None,
    data: str | Path | None = None,
    tokens: tuple[int, ...] | None = None,
    batches: tuple[int, ...] | None = None,
    repeats: int | None = None,
    with_merge_grid: bool | None = None,
    progress: Callable[[str], None] = print,
    context: BenchContext | None = None,
    exclude: tuple[str, ...] = (),
    placement=None,
) -> dict:
    """Measure every method on every (tokens, batch) cell; writes OUT/bench.json after each cell."""
    settings = QUICK if quick else FULL
    tokens = tokens if tokens is not None else settings["tokens"]
    batches = batches if batches is not None else settings["batches"]
    repeats = repeats or settings["repeats"]
    out.mkdir(parents=True, exist_ok=True)
    ctx = context or BenchContext.from_bundle(bundle, data, placement)
    methods = {n: f for n, f in method_table(quick).items() if n not in exclude}
    cells: list[Cell] = []
    merge_cells: list[Cell] = []  # every decode x k x merge mode at one size, with its own base run
    runs: dict[tuple[str, int, int], Run] = {}
    report = {"meta": _meta(ctx, quick, tokens, batches, repeats), "cells": [], "agreement": []}

    def record(chosen: dict[str, Callable], n: int, batch: int, grid: list[Cell]) -> None:
        for cell, run in measure_cell(ctx, chosen, n, batch, repeats):
            grid.append(cell)
            runs.setdefault((cell.method, n, batch), run)
            speed = f"{cell.ms_per_step:8.1f} ms/step  {cell.tokens_per_second:7.1f} tok/s"
            progress(f"{cell.method:<28} {n:>4} tokens  batch {batch:>2}: {speed}  ({cell.repeats} runs)")
        report["cells"] = [asdict(c) for c in cells]
        report["merge_grid"] = [asdict(c) for c in merge_cells]
        report["agreement"] = [asdict(a) for a in agreements(runs)]
        (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    for batch in batches:
        for n in tokens:
            chosen = {name: function for name, function in methods.items() if _runs_at(name, batch, quick)}
            record(chosen, n, batch, cells)
    if with_merge_grid if with_merge_grid is not None else not quick:
        n = 128 if 128 in tokens else tokens[-1]
        record({"base": methods["base"], **merge_grid()}, n, 1, merge_cells)
    return report


def _runs_at(name: str, batch: int, quick: bool) -> bool:
    if batch == 1:
        return True
    if name in PER_SEQUENCE:
        return False  # no batching: its batch cost is batch x the batch-1 cost
    if "recompute" in name:
        return False  # re-runs every sequence per re-route: measured at batch 1 (its cost grows ~B x L)
    return not (quick and name in SLOW_AT_BATCH)


def _meta(ctx: BenchContext, quick: bool, tokens, batches, repeats) -> dict:
    from loramix.system import git_revision, machine_description, package_versions

    return {
        **ctx.description,
        "experts": ctx.names,
        "quick": quick,
        "tokens": list(tokens),
        "batches": list(batches),
        "repeats": repeats,
        "prompt_tokens": len(ctx.tokenizer(ctx.prompts(1)[0]).input_ids),
        "machine": machine_description(),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
