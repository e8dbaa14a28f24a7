"""`loramix bench`: the speed of token-level adaptation against the reference algorithm and plain decoding.

All methods run in one process on the same prompts and the same expert adapters, greedy, with
end-of-sequence suppressed so every method generates exactly N tokens:

- reference      the reference loop written plainly with PEFT: per token decode the text, embed it with MiniLM,
                 build a merged adapter (add_weighted_adapter, `linear`), run the WHOLE text, take one token,
                 delete the adapter. No KV cache. Sequences one at a time (it has no batching).
- peft-scales    what a PEFT user would try: all experts active, per-adapter scales set to the routing weights
                 every k tokens, KV cache kept (same maths as our cached exact mode). One sequence at a time:
                 PEFT scales are per adapter, not per sequence, so a batch cannot be routed per sequence.
- arrow          PEFT's Arrow router (per-token, per-layer, gradient-free) over the same experts, HF generate.
- ours           MixtureModel: cached / recompute decode, k = 1, 2, 4, merge exact / linear / paper.
- ours-base      our decoding loop with the experts off (its overhead over HF generate).
- base, expert   the floor: the base model alone, and one fixed LoRA expert (PEFT), HF generate with KV cache.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loramix.bundle import Bundle, resolve_bundle
from loramix.errors import LoramixError
from loramix.models import load_base_model
from loramix.paths import data_dir, shown_path
from loramix.tasks import TASKS

QUICK = {"tokens": (32,), "batches": (1, 4), "repeats": 1}
FULL = {"tokens": (32, 128, 256), "batches": (1, 8, 16), "repeats": 3}
CELL_BUDGET_SECONDS = 60.0  # stop repeating a cell once its repeats have taken this long


@dataclass
class Run:
    seconds: float
    steps: int
    batch: int
    split: dict[str, float]  # seconds by part: forward, routing, merge, other
    tokens: list[list[int]]
    step_seconds: list[float] = field(default_factory=list)  # per decode step (batch 1 plots)


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


class _StepClock:
    """A logits processor that timestamps every decode step of HF generate."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _steps(times: list[float], start: float) -> list[float]:
    points = [start, *times]
    return [b - a for a, b in zip(points, points[1:])]


class BenchContext:
    """Models and prompts shared by every method (each method gets its own model copy).

    `from_bundle` loads everything from a bundle; the constructor takes ready-made parts, so a script can
    bench models that exist only in memory (e.g. randomly initialised ones of a real model's shape on a GPU).
    """

    def __init__(
        self,
        mixture,
        base: torch.nn.Module,
        peft,
        expert_paths: list[str],
        task_prompts: dict[str, list[str]],
        description: dict,
        bundle: Bundle | None = None,
    ):
        self.mixture = mixture
        self.tokenizer = mixture.tokenizer
        self.names = mixture.expert_names
        self.paths = expert_paths
        self.base = base
        self.peft = peft
        self.task_prompts = task_prompts
        self.description = description  # bundle, base_model: what the report names
        self.bundle = bundle
        self.device = mixture.device
        self._arrow = None

    @classmethod
    def from_bundle(cls, bundle_path: str | Path | None = None, data: str | Path | None = None) -> BenchContext:
        from loramix.generation import MixtureModel

        bundle = Bundle.load(resolve_bundle(bundle_path))
        paths = [str(bundle.root / e.path) for e in bundle.experts]
        mixture = MixtureModel.from_bundle(bundle.root)
        base, _ = load_base_model(bundle.base_model)
        peft_base, _ = load_base_model(bundle.base_model)
        peft = peft_with_experts(peft_base, mixture.expert_names, paths)
        root = data_dir(data)
        task_prompts = {task: [e.prompt for e in spec.load(root, "test")[:16]] for task, spec in TASKS.items()}
        description = {"bundle": shown_path(bundle.root), "base_model": bundle.base_model}
        return cls(mixture, base, peft, paths, task_prompts, description, bundle)

    @property
    def arrow(self):
        if self.bundle is None:
            raise LoramixError("The Arrow baseline needs a bundle on disk (its experts are loaded by PEFT).")
        if self._arrow is None:
            from loramix.baselines import ArrowBaseline

            self._arrow = ArrowBaseline(self.bundle)
        return self._arrow

    def prompts(self, batch: int) -> list[str]:
        """Batch 1: a GSM8K prompt; larger batches: the same number from each task."""
        if batch == 1:
            return self.task_prompts["gsm8k"][:1]
        per_task = -(-batch // len(self.task_prompts))
        mixed = [p for i in range(per_task) for p in (prompts[i] for prompts in self.task_prompts.values())]
        return mixed[:batch]

    @property
    def eos(self) -> list[int]:
        return self.mixture.eos_ids

    def paper_weights(self, text: str) -> list[float]:
        """The reference's routing: embed the text afresh, cosine to centroids, largest x 4, softmax.
        (The same embedder at the same precision as ours, so outputs can be compared token for token.)"""
        from loramix.router import paper_weights

        return paper_weights(self.mixture.router.similarities([text]).similarities)[0].tolist()


def peft_with_experts(model: torch.nn.Module, names: list[str], paths: list[str]):
    """A PeftModel holding every expert adapter, the first one active."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        peft.load_adapter(path, adapter_name=name)
    return peft.eval()


# ---- the methods ----


def run_reference(ctx: BenchContext, prompts: list[str], n: int) -> Run:
    split = {"forward": 0.0, "routing": 0.0, "merge": 0.0, "other": 0.0}
    tokens, step_seconds = [], []
    begin = time.perf_counter()
    for prompt in prompts:
        ids = ctx.tokenizer(prompt).input_ids
        generated: list[int] = []
        for _ in range(n):
            step = time.perf_counter()
            text = ctx.tokenizer.decode(ids + generated, skip_special_tokens=True)
            weights = ctx.paper_weights(text)
            routed = time.perf_counter()
            ctx.peft.add_weighted_adapter(ctx.names, weights, "merged", combination_type="linear")
            ctx.peft.set_adapter("merged")
            merged = time.perf_counter()
            with torch.no_grad():
                logits = ctx.peft(input_ids=torch.tensor([ids + generated], device=ctx.device)).logits[0, -1]
            forwarded = time.perf_counter()
            logits[ctx.eos] = float("-inf")
            generated.append(int(logits.argmax()))
            ctx.peft.set_adapter(ctx.names[0])
            ctx.peft.delete_adapter("merged")
            done = time.perf_counter()
            split["routing"] += routed - step
            split["merge"] += merged - routed + done - forwarded
            split["forward"] += forwarded - merged
            step_seconds.append(done - step)
        tokens.append(generated)
    return Run(time.perf_counter() - begin, n, len(prompts), split, tokens, step_seconds)


def run_peft_scales(ctx: BenchContext, prompts: list[str], n: int, every_k: int = 1) -> Run:
    from peft.tuners.lora import LoraLayer
    from transformers import DynamicCache

    layers = [m for m in ctx.peft.modules() if isinstance(m, LoraLayer)]
    ctx.peft.base_model.set_adapter(ctx.names)
    split = {"forward": 0.0, "routing": 0.0, "merge": 0.0, "other": 0.0}
    tokens, step_seconds = [], []
    begin = time.perf_counter()
    try:
        for prompt in prompts:
            ids = ctx.tokenizer(prompt).input_ids
            generated: list[int] = []
            cache = DynamicCache(config=ctx.peft.config)
            step_input = torch.tensor([ids], device=ctx.device)
            for step in range(n):
                start = time.perf_counter()
                if step % every_k == 0:
                    weights = ctx.paper_weights(ctx.tokenizer.decode(ids + generated, skip_special_tokens=True))
                    routed = time.perf_counter()
                    for layer in layers:
                        for name, weight in zip(ctx.names, weights):
                            layer.set_scale(name, weight)
                    split["routing"] += routed - start
                    split["merge"] += time.perf_counter() - routed
                forward_start = time.perf_counter()
                with torch.no_grad():
                    logits = ctx.peft(input_ids=step_input, cache=cache, use_cache=True).logits[0, -1]
                split["forward"] += time.perf_counter() - forward_start
                logits[ctx.eos] = float("-inf")
                generated.append(int(logits.argmax()))
                step_input = torch.tensor([[generated[-1]]], device=ctx.device)
                step_seconds.append(time.perf_counter() - start)
            tokens.append(generated)
    finally:
        for layer in layers:
            for name in ctx.names:
                layer.set_scale(name, 1.0)
        ctx.peft.set_adapter(ctx.names[0])
    return Run(time.perf_counter() - begin, n, len(prompts), split, tokens, step_seconds)


def _hf_generate(model, tokenizer, prompts: list[str], n: int) -> Run:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    clock = _StepClock()
    begin = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, logits_processor=[clock],
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    seconds = time.perf_counter() - begin
    new = out[:, batch.input_ids.shape[1] :].tolist()
    return Run(seconds, n, len(prompts), {"forward": seconds}, new, _steps(clock.times, begin))


def run_base(ctx: BenchContext, prompts: list[str], n: int) -> Run:
    return _hf_generate(ctx.base, ctx.tokenizer, prompts, n)


def run_expert(ctx: BenchContext, prompts: list[str], n: int) -> Run:
    ctx.peft.set_adapter(ctx.names[0])
    return _hf_generate(ctx.peft, ctx.tokenizer, prompts, n)


def run_arrow(ctx: BenchContext, prompts: list[str], n: int) -> Run:
    return _hf_generate(ctx.arrow.model, ctx.tokenizer, prompts, n)


def run_ours(
    ctx: BenchContext,
    prompts: list[str],
    n: int,
    route: str = "paper",
    every_k: int = 1,
    decode: str = "cached",
    merge: str = "exact",
) -> Run:
    ctx.mixture.set_merge(merge)
    begin = time.perf_counter()
    stream = ctx.mixture.stream(
        prompts, route=route, every_k=every_k, decode=decode, max_new_tokens=n, min_new_tokens=n
    )
    times = [time.perf_counter() for event in stream if event.sequence == 0]
    seconds = time.perf_counter() - begin
    results = stream.results()
    timing = results[0].timing
    forward = timing["prefill"] + timing["decode"]
    split = {"forward": forward, "routing": timing["routing"], "other": seconds - forward - timing["routing"]}
    return Run(seconds, n, len(prompts), split, [r.token_ids for r in results], _steps(times, begin))


def ours_method(decode: str, k: int, merge: str = "exact") -> tuple[str, Callable]:
    name = f"ours {decode} k={k}" + ("" if merge == "exact" else f" {merge}")
    return name, lambda ctx, prompts, n: run_ours(ctx, prompts, n, every_k=k, decode=decode, merge=merge)


PER_SEQUENCE = {"reference", "peft-scales k=1", "peft-scales k=2"}  # methods with no batching
SLOW_AT_BATCH = {"expert"}  # left out of quick runs at batch > 1


def method_table(quick: bool) -> dict[str, Callable]:
    methods: dict[str, Callable] = {
        "reference": run_reference,
        "peft-scales k=1": lambda ctx, p, n: run_peft_scales(ctx, p, n, 1),
        "base": run_base,
        "expert": run_expert,
        "ours-base": lambda ctx, p, n: run_ours(ctx, p, n, route="base"),
    }
    for decode, k, merge in [("cached", 1, "exact"), ("cached", 2, "exact"), ("recompute", 1, "linear")]:
        name, function = ours_method(decode, k, merge)
        methods[name] = function
    if not quick:
        methods["peft-scales k=2"] = lambda ctx, p, n: run_peft_scales(ctx, p, n, 2)
        methods["arrow"] = run_arrow
        for decode, k in [("cached", 4), ("recompute", 2)]:
            name, function = ours_method(decode, k)
            methods[name] = function
        methods["ours cached k=1 fp32 router"] = run_ours_fp32_router
        for route in ("top1", "window:48+16/top1"):  # the sharper and the windowed router (issue: routing)
            methods[f"ours cached k=1 {route}"] = lambda ctx, p, n, route=route: run_ours(ctx, p, n, route=route)
    return methods


def run_ours_fp32_router(ctx: BenchContext, prompts: list[str], n: int) -> Run:
    """Ours at k=1 with the router's embedder in fp32 (exact), to show what bf16 routing saves."""
    embedder = ctx.mixture.router.embedder
    previous, embedder.bf16 = embedder.bf16, False
    try:
        return run_ours(ctx, prompts, n, every_k=1)
    finally:
        embedder.bf16 = previous


def merge_grid() -> dict[str, Callable]:
    """Every decode x k x merge combination, measured at one size."""
    return dict(
        ours_method(d, k, m) for d in ("cached", "recompute") for k in (1, 2, 4) for m in ("exact", "linear", "paper")
    )


# ---- measuring ----


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
) -> dict:
    """Measure every method on every (tokens, batch) cell; writes OUT/bench.json after each cell."""
    settings = QUICK if quick else FULL
    tokens = tokens if tokens is not None else settings["tokens"]
    batches = batches if batches is not None else settings["batches"]
    repeats = repeats or settings["repeats"]
    out.mkdir(parents=True, exist_ok=True)
    ctx = context or BenchContext.from_bundle(bundle, data)
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


# ---- reporting ----

KEPT_MARKER = "<!-- everything below this line is kept when `loramix bench --markdown` rewrites the file -->"


def keep_other_machines(path: Path, text: str) -> str:
    """The new report, followed by whatever an existing report file holds below KEPT_MARKER (e.g. GPU results
    that were measured elsewhere and cannot be rerun here)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if KEPT_MARKER not in old:
        return text
    return text.rstrip("\n") + "\n\n" + old[old.index(KEPT_MARKER) :]


def _cell(report: dict, method: str, n: int, batch: int) -> dict | None:
    return next(
        (c for c in report["cells"] if c["method"] == method and c["tokens"] == n and c["batch"] == batch), None
    )


def targets(report: dict) -> list[dict]:
    """The issue's speed targets, each with its measured figure and pass/fail (None when not measured)."""
    rows = []

    def add(target: str, value: float | None, limit: str, passed: bool | None) -> None:
        rows.append({"target": target, "measured": value, "limit": limit, "passed": passed})

    ref, k1, k2 = (_cell(report, m, 128, 1) for m in ("reference", "ours cached k=1", "ours cached k=2"))
    base = _cell(report, "base", 128, 1)
    speedup = ref["ms_per_step"] / k1["ms_per_step"] if ref and k1 else None
    add(
        "cached k=1, 128 tokens, batch 1: x faster than the reference loop",
        speedup,
        ">= 10",
        None if speedup is None else speedup >= 10,
    )
    for cell in (k1, k2):
        if cell and base:
            overhead = cell["ms_per_step"] / (base["ms_per_step"] + cell["split_ms"]["routing"])
            add(
                f"{cell['method']}: time / (base decode + its router embeddings)", overhead, "<= 1.10", overhead <= 1.10
            )
    ratio = k2["ms_per_step"] / base["ms_per_step"] if k2 and base else None
    add(
        "cached k=2, 128 tokens, batch 1: x the base model's time per token",
        ratio,
        "<= 1.35",
        None if ratio is None else ratio <= 1.35,
    )
    k4, base16 = _cell(report, "ours cached k=4", 128, 16), _cell(report, "base", 128, 16)
    share = k4["tokens_per_second"] / base16["tokens_per_second"] if k4 and base16 else None
    add(
        "batch 16, k=4, 128 tokens: x the base model's throughput",
        share,
        ">= 0.8",
        None if share is None else share >= 0.8,
    )
    return rows


def write_plot(report: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(report["meta"]["tokens"])
    cells = [c for c in report["cells"] if c["batch"] == 1 and c["tokens"] == n and c["step_ms"]]
    if not cells:
        return False
    prompt_length = report["meta"].get("prompt_tokens", 0)
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for cell in cells:
        lengths = [prompt_length + i + 1 for i in range(len(cell["step_ms"]))]
        axis.plot(lengths, cell["step_ms"], label=cell["method"], linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length (prompt + generated tokens)")
    axis.set_ylabel("ms per generated token (log)")
    axis.set_title(f"batch 1, {n} new tokens")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report_files(
    report: dict, out: Path, command: str, plot_name: str = "ms_per_token.png"
) -> tuple[str, str | None]:
    """Write OUT/bench.md and its plot; returns the markdown and the plot's file name (None when nothing to plot)."""
    plot = plot_name if write_plot(report, out / plot_name) else None
    text = render_markdown(report, plot, command)
    (out / "bench.md").write_text(text, encoding="utf-8")
    return text, plot


def render_markdown(report: dict, plot: str | None, command: str) -> str:
    meta = report["meta"]
    lines = ["# Benchmarks", ""]
    lines += [
        f"- command: `{command}`",
        f"- machine: {meta['machine']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model: `{meta['base_model']}` with experts {', '.join(meta['experts'])} (bundle `{meta['bundle']}`)",
        f"- written: {meta['written']}; median of up to {meta['repeats']} repeats after a warm-up, spread = min-max",
        "",
        "Every method generates exactly N tokens greedily (end-of-sequence suppressed) on the same prompts: one GSM8K "
        "prompt at batch 1, prompts from all four tasks at larger batches. `ms/step` is the time per decode step "
        "(for a batch, one step makes one token per sequence); `reference` and `peft-scales` have no batching and "
        "are measured one sequence at a time.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | |",
        "|---|---|---|---|",
    ]
    for row in targets(report):
        value = "" if row["measured"] is None else f"{row['measured']:.2f}"
        verdict = {True: "met", False: "**missed**", None: "not measured"}[row["passed"]]
        lines.append(f"| {row['target']} | {value} | {row['limit']} | {verdict} |")
    for batch in meta["batches"]:
        for n in meta["tokens"]:
            rows = [c for c in report["cells"] if c["batch"] == batch and c["tokens"] == n]
            if not rows:
                continue
            base = _cell(report, "base", n, batch)
            ref = _cell(report, "reference", n, 1)
            lines += ["", f"## {n} new tokens, batch {batch}", ""]
            lines += [
                "| method | ms/step | spread | tokens/s | x reference | x base | forward | routing | merge | other "
                "| peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for c in rows:
                split = c["split_ms"]
                vs_ref = f"{ref['ms_per_step'] * batch / c['ms_per_step']:.1f}" if ref else ""
                vs_base = f"{c['ms_per_step'] / base['ms_per_step']:.2f}" if base else ""
                lines.append(
                    f"| {c['method']} | {c['ms_per_step']:.1f} | {c['spread'][0]:.1f}-{c['spread'][1]:.1f} | "
                    f"{c['tokens_per_second']:.1f} | {vs_ref} | {vs_base} | {split.get('forward', 0):.1f} | "
                    f"{split.get('routing', 0):.1f} | {split.get('merge', 0):.1f} | {split.get('other', 0):.1f} | "
                    f"{c['peak_rss_mb'] if c['peak_rss_mb'] is not None else ''} |"
                )
    grid = report.get("merge_grid") or []
    if grid:
        base = next(c for c in grid if c["method"] == "base")
        lines += [
            "",
            f"## Merge modes x decode modes x k ({grid[0]['tokens']} new tokens, batch 1, one round-robin)",
            "",
        ]
        lines += ["| method | ms/step | spread | x base | routing | other |", "|---|---|---|---|---|---|"]
        for c in grid:
            lines.append(
                f"| {c['method']} | {c['ms_per_step']:.1f} | {c['spread'][0]:.1f}-{c['spread'][1]:.1f} | "
                f"{c['ms_per_step'] / base['ms_per_step']:.2f} | {c['split_ms'].get('routing', 0):.1f} | "
                f"{c['split_ms'].get('other', 0):.1f} |"
            )
    if report["agreement"]:
        lines += ["", "## Outputs that must agree", "", "| check | where | same tokens |", "|---|---|---|"]
        for a in report["agreement"]:
            lines.append(f"| {a['check']} | {a['detail']} | {'yes' if a['same_tokens'] else '**no**'} |")
    if plot:
        lines += ["", f"![ms per token vs sequence length]({plot})"]
    lines += [
        "",
        "Columns: `x reference` is how many times faster than the reference loop per generated token (the reference "
        "at batch B costs B times its batch-1 step); `x base` is ms/step relative to the base model decoding the same "
        "batch with HF generate. The split is ms per step: `forward` the model, `routing` embedding + similarities, "
        "`merge` PEFT adapter building or scale setting, `other` the rest of the loop. Peak RSS is the process's "
        "resident memory above its level when the cell began (models already loaded), sampled every 5 ms.",
        "",
    ]
    return "\n".join(lines)
