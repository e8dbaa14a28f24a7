"""`loramix loadtest`: concurrent streaming clients against a running `loramix serve`, on loopback only.

For each concurrency level, the same requests are sent by that many clients at once (each client takes the
next request when its last one ends). Reported per level: aggregate generated tokens/s, its ratio to one
client at a time, and p50/p99 of the time to first token and of the inter-token latency (client side).
Bounded: a fixed number of requests per level, each with a time limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from loramix.errors import LoramixError

# Short prompts in the four tasks' templates (written for this file, no data set needed).
DEFAULT_PROMPTS = [
    "Question: A baker makes 24 rolls and sells 9. How many rolls are left?\n\nAnswer:",
    "Question: Which of these is a conductor of electricity?\nChoices: A. wood\nB. copper\nC. glass\nD. rubber"
    "\n\nAnswer:",
    "Context:\nThe Amazon river flows through Peru, Colombia and Brazil into the Atlantic Ocean.\n\n"
    "Question: Into which ocean does the Amazon flow?\n\nAnswer:",
    "Write a Python function that returns the largest number in a list.\n\nAnswer:",
    "Question: Sam reads 12 pages a day for 5 days. How many pages does he read?\n\nAnswer:",
    "Question: What do plants need to make food?\nChoices: A. sunlight\nB. sand\nC. salt\nD. smoke\n\nAnswer:",
    "Context:\nMarie Curie was the first person to win two Nobel prizes, in physics and chemistry.\n\n"
    "Question: How many Nobel prizes did Marie Curie win?\n\nAnswer:",
    "Write a SQL query that counts the rows of the table users.\n\nAnswer:",
]


@dataclass
class ClientResult:
    prompt: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    first_token: float | None = None  # seconds from sending to the first token
    gaps: list[float] = field(default_factory=list)  # seconds between tokens
    error: str | None = None


@dataclass
class LevelReport:
    clients: int
    requests: int
    failed: int
    tokens: int
    seconds: float
    tokens_per_second: float
    speedup: float | None  # over one client at a time (None when that level was not run)
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoramixError(f"loadtest sends traffic only to this machine (127.0.0.1, ::1, localhost), not '{host}'.")


async def stream_one(client, url: str, body: dict, timeout: float) -> ClientResult:
    """One streamed completion; the text is the streamed pieces joined, as a client would show it."""
    result = ClientResult(prompt=body["prompt"])
    start = time.perf_counter()
    last = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result.error = chunk["error"]["message"]
                        return result
                    for choice in chunk["choices"]:
                        stamp = time.perf_counter()
                        if result.first_token is None:
                            result.first_token = stamp - start
                        elif last is not None:
                            result.gaps.append(stamp - last)
                        last = stamp
                        result.tokens += 1
                        result.text += choice["text"]
    except TimeoutError:
        result.error = f"no answer within {timeout:.0f} s"
    except Exception as exc:  # noqa: BLE001 - a client's failure is counted, not raised
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


async def run_level(url: str, bodies: list[dict], clients: int, timeout: float, api_key: str | None = None):
    """Send every body with `clients` at a time; returns (results in body order, wall seconds)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[ClientResult | None] = [None] * len(bodies)
    pending = list(enumerate(bodies))

    async def client_loop(client):
        while pending:
            i, body = pending.pop(0)
            results[i] = await stream_one(client, url, body, timeout)

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return results, seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def summarise(clients: int, results: list[ClientResult], seconds: float, single_rate: float | None) -> LevelReport:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    rate = tokens / seconds if seconds > 0 else 0.0
    if clients == 1 and single_rate is None:
        single_rate = rate  # this is the one-at-a-time level
    firsts = [r.first_token for r in ok if r.first_token is not None]
    gaps = [g for r in ok for g in r.gaps]
    return LevelReport(
        clients=clients, requests=len(results), failed=len(results) - len(ok), tokens=tokens, seconds=seconds,
        tokens_per_second=rate, speedup=rate / single_rate if single_rate else None,
        ttft_p50=percentile(firsts, 50), ttft_p99=percentile(firsts, 99),
        itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99),
    )  # fmt: skip


def run_loadtest(
    url: str,
    levels: tuple[int, ...] = (1, 4, 8, 16),
    requests: int = 16,
    max_tokens: int = 64,
    prompts: list[str] | None = None,
    timeout: float = 600.0,
    api_key: str | None = None,
    extra: dict | None = None,
    progress=None,
) -> dict:
    """Every level sends the same `requests` greedy completions of `max_tokens` tokens (no early end)."""
    require_loopback(url)
    prompts = prompts or DEFAULT_PROMPTS
    bodies = [
        {"model": "loramix", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0,
         "stream": True, "min_tokens": max_tokens, **(extra or {})}
        for i in range(requests)
    ]  # fmt: skip
    reports, outputs, single_rate = [], None, None
    for clients in levels:
        results, seconds = asyncio.run(run_level(url, bodies, clients, timeout, api_key))
        report = summarise(clients, results, seconds, single_rate)
        if clients == 1:
            single_rate = report.tokens_per_second
        if outputs is None:
            outputs = [r.text for r in results]
        report_outputs = [r.text for r in results]
        mismatched = sum(a != b for a, b in zip(outputs, report_outputs))
        reports.append({**asdict(report), "outputs_differing_from_first_level": mismatched})
        if progress:
            progress(format_row(reports[-1]))
    return {"url": url, "requests": requests, "max_tokens": max_tokens, "levels": reports}


def format_row(row: dict) -> str:
    speedup = "" if row["speedup"] is None else f"{row['speedup']:.2f}x"
    return (
        f"| {row['clients']} | {row['requests']} | {row['failed']} | {row['tokens']} | {row['seconds']:.1f} | "
        f"{row['tokens_per_second']:.1f} | {speedup} | {1000 * row['ttft_p50']:.0f} | "
        f"{1000 * row['ttft_p99']:.0f} | {1000 * row['itl_p50']:.0f} | {1000 * row['itl_p99']:.0f} | "
        f"{row['outputs_differing_from_first_level']} |"
    )


TABLE_HEADER = (
    "| clients | requests | failed | tokens | wall s | tokens/s | vs 1 client | TTFT p50 ms | TTFT p99 ms | "
    "ITL p50 ms | ITL p99 ms | outputs differing |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
