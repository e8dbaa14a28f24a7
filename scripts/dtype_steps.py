"""Decode step time of the default bundle in each precision, side by side in one process: every (dtype, batch)
is measured once per round, the rounds repeated, and the median kept (this machine's speed drifts between runs).

    python scripts/dtype_steps.py --dtypes fp32,bf16,fp16 --batches 1,8,16 --rounds 3 --tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time

from loramix.generation import GenerationOptions, GenerationStream, MixtureModel
from loramix.hardware import cpu_name
from loramix.loadtest import DEFAULT_PROMPTS


def step_ms(mixture: MixtureModel, batch: int, options: GenerationOptions) -> float:
    """Milliseconds per decode step of `batch` rows, after their prefills and first tokens."""
    prompts = (DEFAULT_PROMPTS * batch)[:batch]
    stream = iter(GenerationStream(mixture, prompts, options))
    for _ in range(batch):
        next(stream)
    steps, start = 0, time.perf_counter()
    for event in stream:
        steps += event.sequence == 0
    return 1000 * (time.perf_counter() - start) / max(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--route", default="hidden")
    args = parser.parse_args()
    dtypes, batches = args.dtypes.split(","), [int(b) for b in args.batches.split(",")]
    options = GenerationOptions(route=args.route, max_new_tokens=args.tokens + 1, min_new_tokens=args.tokens + 1)
    models = {dtype: MixtureModel.from_bundle(None, device="cpu", dtype=dtype) for dtype in dtypes}
    for mixture in models.values():
        step_ms(mixture, 1, options)  # warm-up
    times = {(dtype, batch): [] for dtype in dtypes for batch in batches}
    for _ in range(args.rounds):
        for batch in batches:
            for dtype in dtypes:
                times[dtype, batch].append(step_ms(models[dtype], batch, options))
    print(f"{cpu_name()}, route {args.route}, {args.tokens} tokens, median of {args.rounds} rounds (ms per step)\n")
    print("| batch | " + " | ".join(dtypes) + " | " + " | ".join(f"{d}: speed-up" for d in dtypes[1:]) + " |")
    print("|---" * (2 * len(dtypes)) + "|")
    for batch in batches:
        median = {dtype: statistics.median(times[dtype, batch]) for dtype in dtypes}
        ratios = [f"{median[dtypes[0]] / median[d]:.2f}x" for d in dtypes[1:]]
        print(f"| {batch} | " + " | ".join(f"{median[d]:.1f}" for d in dtypes) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
