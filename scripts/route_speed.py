"""What each routing policy costs: ms per decode step at batch 1 and batch 16, re-routing every token (k=1),
against our own loop with the experts off (`base`), on the default bundle. Every run generates exactly N tokens.

    python scripts/route_speed.py --tokens 128 --routes base,hidden,paper,hidden:2/top1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loramix.generation import MixtureModel
from loramix.loadtest import DEFAULT_PROMPTS


def time_route(mixture: MixtureModel, route: str, batch: int, tokens: int) -> dict:
    prompts = (DEFAULT_PROMPTS * (batch // len(DEFAULT_PROMPTS) + 1))[:batch]
    start = time.perf_counter()
    results = mixture.generate(prompts, route=route, every_k=1, max_new_tokens=tokens, min_new_tokens=tokens)
    seconds = time.perf_counter() - start
    timing = results[0].timing
    return {
        "route": route, "batch": batch, "tokens": tokens, "seconds": round(seconds, 3),
        "ms_per_step": round(1000 * seconds / tokens, 2), "tokens_per_second": round(batch * tokens / seconds, 1),
        "routing_share": round(timing["routing"] / timing["total"], 3) if timing["total"] else 0.0,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", default="base,paper,window:48+16/top1,hidden:2/top1")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all routes; the fastest round counts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    mixture = MixtureModel.from_bundle(None)  # embedder dtype "auto", as users get it
    routes, batches = args.routes.split(","), [int(b) for b in args.batches.split(",")]
    time_route(mixture, routes[-1], 2, 8)  # warm-up
    rounds = [[time_route(mixture, r, b, args.tokens) for b in batches for r in routes] for _ in range(args.repeats)]
    rows = [min(cells, key=lambda row: row["ms_per_step"]) for cells in zip(*rounds)]  # interleaved rounds: fair
    base = {r["batch"]: r["ms_per_step"] for r in rows if r["route"] == "base"}
    print(
        "| route (k=1) | batch | ms/step | tokens/s | x experts-off loop | routing share |\n|---|---|---|---|---|---|"
    )
    for row in rows:
        row["vs_base"] = round(row["ms_per_step"] / base[row["batch"]], 3) if row["batch"] in base else None
        print(f"| {row['route']} | {row['batch']} | {row['ms_per_step']} | {row['tokens_per_second']} | "
              f"{row['vs_base']}x | {100 * row['routing_share']:.1f}% |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
