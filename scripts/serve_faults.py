"""The serving fault table: what a hostile and a busy user meet, tried against a live `loramix serve`.

    python scripts/serve_faults.py --out benchmarks/serve-faults-cpu-2core.json [--src OTHER_CHECKOUT/src]

Starts its own server (loopback, free port; `--src` runs another checkout's code, to measure before and after
side by side) on the default bundle, and tries, one row each:
1. a request with temperature 1e-40 while another client streams: both statuses, and whether the stream equals
   the same request alone;
2. a 3,004-token prompt sent while another client streams 200 tokens: the stream's longest and median gap, and
   the long prompt's own time to first token;
3. a 7,511-token prompt alone: time to first token;
4. SIGTERM while a client streams: did the stream complete ([DONE]), and the exit code;
5. GET /openapi.json: does each POST endpoint describe its request body?
Bounded: every request has a time limit, and the server is stopped by its id at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

TEXT = (
    "The river rises in the northern hills, where rain falls on most days of the year, and runs south through "
    "farmland, two market towns and a wide marsh before it reaches the sea. "
)
STREAM_PROMPT = "Question: A baker makes 24 rolls and sells 9. How many rolls are left?\n\nAnswer:"


def prompt_of(tokenizer, tokens: int) -> list[int]:
    ids = tokenizer(TEXT * (tokens // 20 + 1)).input_ids[: tokens - 12]
    return ids + tokenizer("\n\nQuestion: Where does the river rise?\n\nAnswer:").input_ids[:12]


def start(src: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    return subprocess.Popen(
        [sys.executable, "-m", "loramix", "serve", "--port", str(port), *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not healthy in time")


def stream(url: str, body: dict, timeout: float = 900) -> dict:
    """A streamed completion: text, status, the time of each token chunk, whether [DONE] came."""
    out = {"status": None, "text": "", "stamps": [], "done": False, "error": None, "start": time.perf_counter()}
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["error"] = r.read().decode()[:300]
                return out
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["error"] = chunk["error"]["message"]
                    elif chunk.get("choices"):
                        out["stamps"].append(time.perf_counter())
                        out["text"] += chunk["choices"][0]["text"]
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def in_background(function, *args) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(function(*args)))
    thread.start()
    return thread, box


def row_tiny_temperature(url: str) -> dict:
    body = {"model": "loramix", "prompt": STREAM_PROMPT, "max_tokens": 60, "min_tokens": 60, "temperature": 0}
    thread, box = in_background(stream, url, body)
    time.sleep(3)
    tiny = {**body, "max_tokens": 8, "min_tokens": 8, "temperature": 1e-40}
    bad = httpx.post(url + "/v1/completions", json=tiny, timeout=600)
    thread.join()
    alone = stream(url, body)
    return {
        "tiny_temperature_status": bad.status_code,
        "stream_status": box["status"], "stream_error": box["error"],
        "stream_equals_alone": box["text"] == alone["text"] and box["error"] is None,
    }  # fmt: skip


def gaps(stamps: list[float], after: float = 0.0) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:]) if b > after]


def row_long_beside_stream(url: str, long_ids: list[int]) -> dict:
    body = {"model": "loramix", "prompt": STREAM_PROMPT, "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    thread, box = in_background(stream, url, body)
    time.sleep(5)  # the stream is under way
    arrived = time.perf_counter()
    long = stream(url, {"model": "loramix", "prompt": long_ids, "max_tokens": 4, "temperature": 0})
    thread.join()
    all_gaps = gaps(box["stamps"])
    return {
        "long_prompt_tokens": len(long_ids),
        "stream_longest_gap_s": round(max(gaps(box["stamps"], arrived), default=float("nan")), 3),
        "stream_median_gap_s": round(statistics.median(all_gaps), 3) if all_gaps else None,
        "long_ttft_s": round(long["stamps"][0] - long["start"], 2) if long["stamps"] else None,
        "long_error": long["error"], "stream_error": box["error"],
    }  # fmt: skip


def row_long_alone(url: str, long_ids: list[int]) -> dict:
    long = stream(url, {"model": "loramix", "prompt": long_ids, "max_tokens": 4, "temperature": 0})
    return {
        "long_prompt_tokens": len(long_ids),
        "long_ttft_s": round(long["stamps"][0] - long["start"], 2) if long["stamps"] else None,
        "long_error": long["error"],
    }  # fmt: skip


def row_sigterm(url: str, process: subprocess.Popen) -> dict:
    body = {"model": "loramix", "prompt": STREAM_PROMPT, "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    thread, box = in_background(stream, url, body)
    time.sleep(4)
    process.send_signal(signal.SIGTERM)
    thread.join()
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "killed after 120 s"
    return {
        "chunks_received": len(box["stamps"]), "stream_completed": box["done"] and box["error"] is None,
        "stream_error": box["error"], "exit_code": code,
    }  # fmt: skip


def row_openapi(url: str) -> dict:
    spec = httpx.get(url + "/openapi.json", timeout=30).json()
    described = {}
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = spec.get("paths", {}).get(path, {}).get("post", {})
        described[path] = "requestBody" in operation
    return {"request_body_schemas": described}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--src", default=None, help="Run the server from another checkout's src folder.")
    parser.add_argument("--rows", default="1,2,3,4,5", help="Which rows to try (comma-separated numbers).")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from loramix.models import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = start(args.src, port, ["--max-new-tokens-limit", "512"])
    report: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}  # rows re-run replace their own
    report |= {"src": args.src or "this checkout", "cpu": cpu_name()}
    try:
        wait_healthy(url, process)
        for name, row in (
            ("1_tiny_temperature_beside_a_stream", lambda: row_tiny_temperature(url)),
            ("2_3004_token_prompt_beside_a_stream", lambda: row_long_beside_stream(url, prompt_of(tokenizer, 3004))),
            ("3_7511_token_prompt_alone", lambda: row_long_alone(url, prompt_of(tokenizer, 7511))),
            ("5_openapi", lambda: row_openapi(url)),
            ("4_sigterm_during_a_stream", lambda: row_sigterm(url, process)),
        ):
            if name.split("_", 1)[0] not in args.rows.split(","):
                continue
            began = time.perf_counter()
            report[name] = row()
            print(name, report[name], f"({time.perf_counter() - began:.0f} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
