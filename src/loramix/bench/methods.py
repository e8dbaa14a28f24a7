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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramix.bundle import Bundle, resolve_bundle
from loramix.errors import LoramixError
from loramix.hardware import Placement
from loramix.models import load_base_model
from loramix.paths import data_dir, shown_path
from loramix.tasks import TASKS


@dataclass
class Run:
    seconds: float
    steps: int
    batch: int
    split: dict[str, float]  # seconds by part: forward, routing, merge, other
    tokens: list[list[int]]
    step_seconds: list[float] = field(default_factory=list)  # per decode step (batch 1 plots)


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
    def from_bundle(
        cls, bundle_path: str | Path | None = None, data: str | Path | None = None, placement: Placement | None = None
    ) -> BenchContext:
        from loramix.generation import MixtureModel

        device, dtype = (placement or Placement("cpu", "fp32")).resolve()
        bundle = Bundle.load(resolve_bundle(bundle_path))
        paths = [str(bundle.root / e.path) for e in bundle.experts]
        mixture = MixtureModel.from_bundle(bundle.root, device=device, dtype=dtype)
        base, _ = load_base_model(bundle.base_model, dtype=dtype, device=device)
        peft_base, _ = load_base_model(bundle.base_model, dtype=dtype, device=device)
        peft = peft_with_experts(peft_base, mixture.expert_names, paths)
        root = data_dir(data)
        task_prompts = {task: [e.prompt for e in spec.load(root, "test")[:16]] for task, spec in TASKS.items()}
        description = {"bundle": shown_path(bundle.root), "base_model": bundle.base_model, **mixture.placement}
        return cls(mixture, base, peft, paths, task_prompts, description, bundle)

    @property
    def arrow(self):
        if self.bundle is None:
            raise LoramixError("The Arrow baseline needs a bundle on disk (its experts are loaded by PEFT).")
        if self._arrow is None:
            from loramix.baselines import ArrowBaseline

            self._arrow = ArrowBaseline(self.bundle, device=self.device, dtype=self.mixture.dtype)
        return self._arrow

    def prompts(self, batch: int) -> list[str]:
        """Batch 1: the first task's first prompt (GSM8K's); larger batches: the same number from each task."""
        if batch == 1:
            return next(iter(self.task_prompts.values()))[:1]
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
        # the default (hidden states), the cheapest hidden policy, the sharper and the windowed MiniLM router, and
        # the two in-layer routers
        for route in ("hidden", "hidden:2/top1", "top1", "window:48+16/top1", "arrow", "spectr"):
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
