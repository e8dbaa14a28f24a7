"""The engine's own thread: it steps the engine while there is work, and hands each sequence's events to the
asyncio queue of the request that owns it. Requests are refused here when the queue is full (429), when they can
never fit the KV budget (400) and while the server drains for shutdown (503).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass

from loramix.engine import Engine
from loramix.openai_protocol import ApiError
from loramix.sequences import SequenceState, TokenEvent

RETRY_AFTER_DRAINING = 5  # seconds a client is told to wait when this server is shutting down


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrived: float
    last_token: float | None = None


class EngineWorker:
    """Owns the engine and the one thread that steps it."""

    def __init__(self, engine: Engine, max_queue: int, metrics):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.draining = False
        self._listeners: dict[int, _Listener] = {}
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loramix-engine", daemon=True)
        self._thread.start()

    def next_index(self) -> int:
        return next(self._numbers)

    @property
    def idle(self) -> bool:
        return not self.engine.busy

    def submit(self, seqs: list[SequenceState]) -> asyncio.Queue:
        """Queue the sequences of one request; their events arrive on the returned queue."""
        if self.draining:
            raise ApiError(503, "The server is shutting down; retry shortly (or on another replica).",
                           headers={"Retry-After": str(RETRY_AFTER_DRAINING)})  # fmt: skip
        needed = self.engine.scheduler.fits_alone(seqs)
        if needed is not None:
            raise ApiError(
                400, f"This request needs {needed} tokens of KV cache (prompt + max_tokens, for each of its "
                f"{len(seqs)} sequence(s)), more than this server's whole budget of "
                f"{self.engine.scheduler.budgets.max_batch_tokens} (--max-batch-tokens); send a shorter prompt, "
                "a lower max_tokens or a lower n.", "max_tokens",
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            waiting = len(self.engine.waiting)
            if waiting + len(seqs) > self.max_queue:
                raise ApiError(429, f"The queue is full ({waiting} sequences waiting); retry shortly.",
                               headers={"Retry-After": "1"})  # fmt: skip
            arrived = time.perf_counter()
            for seq in seqs:
                self._listeners[seq.index] = _Listener(loop, queue, arrived)
                self.engine.add(seq)
        self._wake.set()
        return queue

    def cancel(self, seqs: list[SequenceState]) -> None:
        with self._lock:
            for seq in seqs:
                if not seq.finished:
                    self.engine.cancel(seq)
                    self.metrics.cancelled.inc()
                self._listeners.pop(seq.index, None)
        self._wake.set()

    def end_all(self, error: ApiError) -> int:
        """End every request still running or waiting with `error` as its last event; returns how many."""
        with self._lock:
            listeners = dict(self._listeners)
            self._listeners.clear()
            for seq in list(self.engine.waiting):
                self.engine.cancel(seq)
        for listener in listeners.values():
            listener.loop.call_soon_threadsafe(listener.queue.put_nowait, ("error", error))
        self._cancel_running()
        self._wake.set()
        return len({id(listener.queue) for listener in listeners.values()})

    def _cancel_running(self) -> None:
        for lane in list(self.engine.lanes.values()):  # copies: the engine's thread may be changing them
            for seq in list(lane.rows):
                self.engine.cancel(seq)
        for job in list(self.engine.scheduler.prefilling):
            self.engine.cancel(job.seq)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            routing_before, reroutes_before = self.engine.timing["routing"], self.engine.reroutes
            try:
                events = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a failure no sequence owns: end what runs, keep serving
                self._fail_everything(exc)
                continue
            self.metrics.routing_seconds.inc(self.engine.timing["routing"] - routing_before)
            self.metrics.reroutes.inc(self.engine.reroutes - reroutes_before)
            self.metrics.steps.inc()
            self._deliver(events)
            self.metrics.queue_depth.set(len(self.engine.waiting))
            self.metrics.running.set(self.engine.running)

    def _deliver(self, events: list[TokenEvent]) -> None:
        stamp = time.perf_counter()
        with self._lock:
            for event in events:
                listener = self._listeners.get(event.sequence)
                if listener is None:
                    continue
                if event.finish_reason == "error":
                    self.metrics.failed.inc()
                    message = f"This request failed ({event.error}); other requests were not affected."
                    listener.loop.call_soon_threadsafe(listener.queue.put_nowait, ("error", ApiError(500, message)))
                    self._listeners.pop(event.sequence, None)
                    continue
                if listener.last_token is None:
                    self.metrics.time_to_first_token.observe(stamp - listener.arrived)
                else:
                    self.metrics.inter_token_latency.observe(stamp - listener.last_token)
                listener.last_token = stamp
                self.metrics.generated_tokens.inc()
                listener.loop.call_soon_threadsafe(listener.queue.put_nowait, ("token", event))
                if event.finished:
                    self._listeners.pop(event.sequence, None)

    def _fail_everything(self, exc: Exception) -> None:
        message = f"The engine failed on a step ({type(exc).__name__}: {exc}); the running requests were ended."
        self.end_all(ApiError(500, message))
        self.engine.lanes.clear()
        self.engine.scheduler.prefilling.clear()
