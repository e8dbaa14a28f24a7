"""A soak run: N streaming clients against one `loramix serve` for a fixed time, then every distinct request once
more, alone; reports errors, the server's resident memory over time, and whether every greedy answer under load
equals the same request alone.

    python scripts/soak.py --minutes 10 --clients 16 --out benchmarks/soak-cpu-2core.json

Starts its own server (loopback, a free port, the default bundle) and stops it by its id at the end. Bounded: a
fixed duration, each request with a time limit. Memory growth is measured after a warm-up (the first minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loramix.loadtest import DEFAULT_PROMPTS, stream_one

VARIANTS = [{}, {"every_k": 2}, {"route": "prompt:top1"}, {"route": "boost"}, {"merge": "linear"}, {"every_k": 4}]


def bodies(max_tokens: int) -> list[dict]:
    return [
        {"model": "loramix", "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
         "stream": True, **variant}
        for prompt in DEFAULT_PROMPTS for variant in VARIANTS
    ]  # fmt: skip


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, pid: int, clients: int, seconds: float, max_tokens: int) -> dict:
    work = bodies(max_tokens)
    answers: dict[int, set[str]] = {}
    errors: list[str] = []
    memory: list[tuple[float, float]] = []
    start = time.perf_counter()
    counter = {"next": 0, "done": 0, "tokens": 0}

    async def client(http):
        while time.perf_counter() - start < seconds:
            i = counter["next"] % len(work)
            counter["next"] += 1
            result = await stream_one(http, url, work[i], timeout=600)
            if result.error:
                errors.append(result.error)
            else:
                answers.setdefault(i, set()).add(result.text)
                counter["done"] += 1
                counter["tokens"] += result.tokens

    async def sample():
        while time.perf_counter() - start < seconds:
            memory.append((round(time.perf_counter() - start, 1), round(rss_mb(pid), 1)))
            await asyncio.sleep(5)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as http:
        await asyncio.gather(sample(), *(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
        alone = {}
        for i in sorted(answers):
            result = await stream_one(http, url, work[i], timeout=600)
            alone[i] = result.text
    warm = [mb for t, mb in memory if t >= 60] or [mb for _, mb in memory]
    return {
        "clients": clients, "seconds": round(wall, 1), "requests": counter["done"], "errors": len(errors),
        "first_errors": errors[:3], "tokens_per_second": round(counter["tokens"] / wall, 1),
        "rss_mb_after_warmup": warm[0], "rss_mb_end": warm[-1],
        "rss_growth_after_warmup": round((warm[-1] - warm[0]) / warm[0], 4),
        "distinct_requests": len(answers),
        "answers_equal_alone": sum(texts == {alone[i]} for i, texts in answers.items()),
        "memory": memory,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "loramix", "serve", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        report = asyncio.run(soak(url, process.pid, args.clients, 60 * args.minutes, args.max_tokens))
        report["cpu"] = f"{cpu()} ({os.cpu_count()} cores)"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "memory"}, indent=1))
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def cpu() -> str:
    from loramix.hardware import cpu_name

    return cpu_name()


if __name__ == "__main__":
    main()
