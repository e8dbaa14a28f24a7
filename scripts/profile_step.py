"""Where a decode step's time goes: torch.profiler over N decode steps of the default bundle (after a warm-up and
the prefill), grouped by operator, and the share of the step that is not matrix multiplication.

    python scripts/profile_step.py --route hidden --batch 1 --tokens 32 --rows 25
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from loramix.generation import GenerationOptions, GenerationStream, MixtureModel
from loramix.loadtest import DEFAULT_PROMPTS

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
            "aten::fbgemm_linear_fp16_weight_fp32_activation")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--route", default="hidden")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25, help="operators shown")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    mixture = MixtureModel.from_bundle(None, dtype=args.dtype)
    prompts = (DEFAULT_PROMPTS * args.batch)[: args.batch]
    options = GenerationOptions(
        route=args.route, every_k=1, max_new_tokens=args.tokens + 2, min_new_tokens=args.tokens + 2
    )
    mixture.generate(prompts[:1], options)  # warm-up
    stream = iter(GenerationStream(mixture, prompts, options))
    for _ in range(args.batch):  # the prefill and first token of every row
        next(stream)
    steps, start = 0, time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for event in stream:
            steps += event.sequence == 0
    seconds = time.perf_counter() - start
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMULS)
    calls = sum(e.count for e in averages)
    print(f"{steps} steps, {1000 * seconds / max(steps, 1):.1f} ms/step under the profiler; "
          f"{calls / max(steps, 1):.0f} operator calls per step; matmul share of operator self time "
          f"{100 * matmul / total:.0f}%")  # fmt: skip
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
