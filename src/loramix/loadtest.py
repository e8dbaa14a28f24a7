"""`loramix loadtest`: concurrent streaming clients against a running OpenAI-compatible server, on loopback only.

Scenarios:
- levels (default): for each concurrency level, the same requests are sent by that many clients at once (each
  client takes the next request when its last one ends). Reported per level: aggregate generated tokens/s, its
  ratio to one client at a time, and p50/p99 of the time to first token and of the inter-token latency.
- long-prompt: `clients` streams run; once each has its first token, one request with a prompt of about
  `long_tokens` tokens arrives. Reported: the running streams' longest and median gap between tokens (does the
  newcomer's prefill freeze them?) and the long prompt's own time to first token.
- mixtures: like levels, but every request asks for its own fixed mixture of the experts (`fixed:w1,...`), the
  case a server that batches only requests with equal adapter settings cannot batch.
Bounded: a fixed number of requests, each with a time limit. `model` names the model sent (default loramix), so
the same client measures any OpenAI-compatible server; requests also carry `ignore_eos` for servers without
`min_tokens`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from loramix.errors import LoramixError, OptionError
from loramix.options import option

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


SCENARIOS = ("levels", "long-prompt", "mixtures")


@dataclass(frozen=True)
class LoadtestOptions:
    """What `loramix loadtest` can be told; its flags come from here."""

    url: str = option("http://127.0.0.1:8000", "A running OpenAI-compatible server on this machine.")
    scenario: str = option("levels", "levels, long-prompt (one long prompt beside running streams) or mixtures.")
    clients: str = option("1,4,8,16", "Concurrency levels, e.g. 1,4,8,16 (long-prompt: the first is the streams).")
    requests: int = option(16, "Requests per level (the same ones at every level).")
    max_tokens: int = option(64, "Tokens per request (no early end).")
    long_tokens: int = option(3000, "long-prompt: about this many prompt tokens in the long request.")
    model: str = option("loramix", "Model name sent (another server's, to measure it with the same client).")
    flavour: str = option(
        "loramix",
        "The server's dialect: loramix, or llama.cpp (mixtures as its LoRA scales, and its prompt cache off: every "
        "level sends the same prompts, which it would otherwise answer from that cache).",
    )
    every_k: int | None = option(None, "Sent as every_k (default: the server's).")
    route: str | None = option(None, "Sent as route (default: the server's).")
    api_key: str | None = option(None, "Bearer key, if the server wants one.")
    out: str | None = option(None, "Write the report as JSON here.")

    def levels(self) -> tuple[int, ...]:
        try:
            levels = tuple(int(x) for x in self.clients.split(","))
        except ValueError:
            levels = ()
        if not levels or min(levels) < 1:
            raise OptionError("clients", f"takes comma-separated whole numbers of at least 1, got '{self.clients}'.")
        if self.scenario not in SCENARIOS:
            raise OptionError("scenario", f"must be one of {', '.join(SCENARIOS)}, got '{self.scenario}'.")
        if self.flavour not in ("loramix", "llama.cpp"):
            raise OptionError("flavour", f"must be loramix or llama.cpp, got '{self.flavour}'.")
        return levels

    def extra(self) -> dict:
        fields = {k: v for k, v in (("every_k", self.every_k), ("route", self.route)) if v is not None}
        if self.flavour == "llama.cpp":
            fields["cache_prompt"] = False  # the same prompt at every level is not a prefix a client would share
        return fields


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


def _body(model: str, prompt: str, max_tokens: int, extra: dict | None) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "min_tokens": max_tokens, "ignore_eos": True, **(extra or {})}  # fmt: skip


def mixture_weights(count: int, n_experts: int, seed: int = 0) -> list[list[float]]:
    """`count` distinct mixtures of `n_experts` experts (rows sum to 1), the same for every run."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        draws = [rng.expovariate(1.0) for _ in range(n_experts)]
        rows.append([round(d / sum(draws), 3) for d in draws])
    return rows


def expert_count(url: str, api_key: str | None, flavour: str) -> int:
    """How many experts the server mixes: loramix's /info, or llama.cpp's /lora-adapters."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = "/lora-adapters" if flavour == "llama.cpp" else "/info"
    response = httpx.get(url + path, headers=headers, timeout=30)
    if response.status_code != 200:
        raise LoramixError(f"GET {url}{path} answered {response.status_code}; is the server up and of that kind?")
    data = response.json()
    return len(data) if flavour == "llama.cpp" else len(data["experts"])


def mixture_field(weights: list[float], flavour: str) -> dict:
    """How a request asks for a fixed mixture: loramix's route, or llama.cpp's per-request LoRA scales."""
    if flavour == "llama.cpp":
        return {"lora": [{"id": i, "scale": w} for i, w in enumerate(weights)]}
    return {"route": "fixed:" + ",".join(f"{w:g}" for w in weights)}


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
    model: str = "loramix",
    mixtures: tuple[int, str] | None = None,
) -> dict:
    """Every level sends the same `requests` greedy completions of `max_tokens` tokens (no early end).
    mixtures: (n_experts, flavour): request i asks for mixture i (`mixture_weights`)."""
    require_loopback(url)
    prompts = prompts or DEFAULT_PROMPTS
    bodies = [_body(model, prompts[i % len(prompts)], max_tokens, extra) for i in range(requests)]
    if mixtures is not None:
        for body, weights in zip(bodies, mixture_weights(requests, mixtures[0])):
            body.update(mixture_field(weights, mixtures[1]))
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
        errors = sorted({r.error for r in results if r.error})[:3]
        reports.append({**asdict(report), "outputs_differing_from_first_level": mismatched, "errors": errors})
        if progress:
            progress(format_row(reports[-1]))
    return {"url": url, "model": model, "requests": requests, "max_tokens": max_tokens, "levels": reports,
            "mixtures": mixtures is not None}  # fmt: skip


LONG_TEXT = (
    "The river rises in the northern hills, where rain falls on most days of the year, and runs south through "
    "farmland, two market towns and a wide marsh before it reaches the sea. "
)


def long_prompt(tokens: int) -> str:
    """A reading-comprehension prompt of roughly `tokens` tokens (about 1.3 tokens a word for Llama tokenizers)."""
    words = len(LONG_TEXT.split())
    repeats = max(1, round(tokens / (1.3 * words)))
    return "Context:\n" + LONG_TEXT * repeats + "\n\nQuestion: Where does the river rise?\n\nAnswer:"


async def _long_prompt_run(url, clients, max_tokens, long_tokens, long_max_tokens, timeout, api_key, model, extra):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bodies = [_body(model, DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)], max_tokens, extra) for i in range(clients)]
    long_body = _body(model, long_prompt(long_tokens), long_max_tokens, extra)
    long_body["stream_options"] = {"include_usage": True}
    started: list[asyncio.Event] = [asyncio.Event() for _ in bodies]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:

        async def running(i):
            result = ClientResult(prompt=bodies[i]["prompt"])
            stamps = []
            async with client.stream("POST", url + "/v1/completions", json=bodies[i]) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}"
                    started[i].set()
                    return result, stamps
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                        stamps.append(time.perf_counter())
                        started[i].set()
            return result, stamps

        tasks = [asyncio.create_task(running(i)) for i in range(clients)]
        await asyncio.gather(*(event.wait() for event in started))
        arrival = time.perf_counter()
        long_result = await stream_one(client, url, long_body, timeout)
        runs = await asyncio.gather(*tasks)
    gaps_after = [b - a for _, stamps in runs for a, b in zip(stamps, stamps[1:]) if b > arrival]
    all_gaps = [b - a for _, stamps in runs for a, b in zip(stamps, stamps[1:])]
    return {
        "clients": clients, "max_tokens": max_tokens, "long_prompt_words": len(long_body["prompt"].split()),
        "long_ttft": long_result.first_token, "long_error": long_result.error,
        "longest_gap_after_arrival": max(gaps_after, default=float("nan")),
        "median_gap": statistics.median(all_gaps) if all_gaps else float("nan"),
        "streams_failed": sum(r.error is not None for r, _ in runs),
    }  # fmt: skip


def run_long_prompt(
    url: str, clients: int = 1, max_tokens: int = 200, long_tokens: int = 3000, long_max_tokens: int = 8,
    timeout: float = 900.0, api_key: str | None = None, model: str = "loramix", extra: dict | None = None,
) -> dict:  # fmt: skip
    """The long-prompt scenario (see the module docstring)."""
    require_loopback(url)
    return asyncio.run(
        _long_prompt_run(url, clients, max_tokens, long_tokens, long_max_tokens, timeout, api_key, model, extra)
    )


def long_prompt_line(report: dict) -> str:
    """The long-prompt scenario in one line."""
    ttft = report["long_ttft"] if report["long_ttft"] is not None else float("nan")
    line = (
        f"{report['clients']} stream(s): longest gap after the long prompt arrived "
        f"{report['longest_gap_after_arrival']:.2f} s (median gap {report['median_gap']:.3f} s); the long prompt's "
        f"first token after {ttft:.1f} s"
    )
    return line + (f" [error: {report['long_error']}]" if report["long_error"] else "")


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
