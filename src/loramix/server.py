"""`loramix serve`: the OpenAI API over one continuous-batching engine, with a live routing view at `/`.

One thread steps the engine (`loramix.engine`); each HTTP request turns into sequences that join the running
batch between steps, and receives its tokens on an asyncio queue as they are produced. A client that goes away
has its sequences cancelled at the next step. The model loads in the background: /health answers 503 until then.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from loramix.engine import Engine
from loramix.errors import LoramixError
from loramix.openai_api import (
    MODEL,
    ApiError,
    ChatRequest,
    CompletionRequest,
    ServerLimits,
    StopHoldback,
    finish_reason,
    new_id,
    now,
    options_for,
    param_named_in,
    parse_request,
    routing_of_token,
    routing_trace,
    usage,
)
from loramix.router import DEFAULT_EVERY_K, DEFAULT_ROUTE, parse_route
from loramix.sequences import GenerationOptions, SequenceState, TokenEvent
from loramix.telemetry import ServerMetrics


@dataclass(frozen=True)
class ServeSettings:
    """Everything `loramix serve` can be told; the CLI's options and defaults come from here."""

    bundle: str | None = None  # the bundle folder (None: the trained default bundle)
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # if set, /v1/* needs "Authorization: Bearer KEY"
    max_batch: int = 16  # sequences decoded together; more wait in the queue
    max_queue: int = 64  # sequences waiting beyond the running batch; more are answered 429
    max_new_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    merge: str = "exact"  # merge mode of requests that do not choose one
    every_k: int = DEFAULT_EVERY_K  # re-route every k tokens, for requests that do not say
    route: str = DEFAULT_ROUTE  # routing rule of the `loramix` model, for requests that do not say
    decode: str = "cached"
    embedder_dtype: str = "auto"

    def check(self, expert_names: list[str] | None = None) -> None:
        """Refuse settings that cannot serve; the route is checked once the experts' names are known."""
        for name in ("max_batch", "max_queue", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise LoramixError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not 0 < self.port < 65536:
            raise LoramixError(f"--port must be between 1 and 65535, got {self.port}.")
        self.default_options().validate()
        if expert_names is not None:
            parse_route(self.route, expert_names)

    def default_options(self) -> GenerationOptions:
        return GenerationOptions(every_k=self.every_k, route=self.route, decode=self.decode, merge=self.merge)


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrived: float
    last_token: float | None = None


class EngineWorker:
    """Owns the engine and the one thread that steps it; hands each sequence's events to its request."""

    def __init__(self, mixture, settings: ServeSettings, metrics: ServerMetrics):
        self.mixture = mixture
        self.settings = settings
        self.metrics = metrics
        self.engine = Engine(mixture, max_batch=settings.max_batch)
        self._listeners: dict[int, _Listener] = {}
        self._sequences: dict[int, SequenceState] = {}
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loramix-engine", daemon=True)
        self._thread.start()

    def next_index(self) -> int:
        return next(self._numbers)

    def submit(self, seqs: list[SequenceState]) -> asyncio.Queue:
        """Queue the sequences of one request; their events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            waiting = len(self.engine.waiting)
            if waiting + len(seqs) > self.settings.max_queue:
                raise ApiError(429, f"The queue is full ({waiting} sequences waiting); retry shortly.")
            arrived = time.perf_counter()
            for seq in seqs:
                self._listeners[seq.index] = _Listener(loop, queue, arrived)
                self._sequences[seq.index] = seq
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
                self._sequences.pop(seq.index, None)
        self._wake.set()

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
            except Exception as exc:  # noqa: BLE001 - one bad step must not take the server down
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
                if listener.last_token is None:
                    self.metrics.time_to_first_token.observe(stamp - listener.arrived)
                else:
                    self.metrics.inter_token_latency.observe(stamp - listener.last_token)
                listener.last_token = stamp
                self.metrics.generated_tokens.inc()
                listener.loop.call_soon_threadsafe(listener.queue.put_nowait, ("token", event))
                if event.finished:
                    self._listeners.pop(event.sequence, None)
                    self._sequences.pop(event.sequence, None)

    def _fail_everything(self, exc: Exception) -> None:
        message = f"The engine failed on a step ({type(exc).__name__}: {exc}); the running requests were ended."
        with self._lock:
            for listener in self._listeners.values():
                listener.loop.call_soon_threadsafe(listener.queue.put_nowait, ("error", ApiError(500, message)))
            self._listeners.clear()
            self._sequences.clear()
            self.engine = Engine(self.mixture, max_batch=self.settings.max_batch)


@dataclass
class ServerState:
    settings: ServeSettings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    mixture: object = None
    worker: EngineWorker | None = None
    error: str | None = None  # why loading failed

    @property
    def limits(self) -> ServerLimits:
        return ServerLimits(self.settings.max_new_tokens_limit, self.settings.default_options())


def create_app(settings: ServeSettings, load: Callable[[], object] | None = None, replica: str | None = None):
    """The FastAPI app. `load` returns the MixtureModel (default: the settings' bundle); it runs in the background.
    `replica` names this copy of the server (Ray Serve): every response says which one answered."""
    settings.check()
    state = ServerState(settings)

    def load_model() -> None:
        try:
            if load is not None:
                mixture = load()
            else:
                from loramix.generation import MixtureModel

                mixture = MixtureModel.from_bundle(
                    settings.bundle, merge=settings.merge, embedder_dtype=settings.embedder_dtype
                )
            settings.check(mixture.expert_names)
            mixture.state.check_mode(settings.merge)
            state.mixture = mixture
            state.worker = EngineWorker(mixture, settings, state.metrics)
        except Exception as exc:  # noqa: BLE001 - reported by /health, the server stays up to say so
            state.error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=load_model, name="loramix-load", daemon=True)
        loader.start()
        yield
        if state.worker is not None:
            state.worker.stop()

    app = FastAPI(title="loramix", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.loramix = state
    if replica is not None:

        @app.middleware("http")
        async def name_the_replica(request: Request, call_next):
            response = await call_next(request)
            response.headers["X-Loramix-Replica"] = replica
            return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        state.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    def ready(request: Request):
        if settings.api_key is not None:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {settings.api_key}":
                raise ApiError(
                    401, "Missing or wrong API key; send 'Authorization: Bearer KEY'.", code="invalid_api_key"
                )
        if state.worker is None:
            raise ApiError(503, state.error or "The model is still loading; retry shortly (see GET /health).")
        return state.mixture, state.worker

    @app.get("/health")
    async def health():
        if state.worker is None:
            status = "failed" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error}, status_code=503)
        engine = state.worker.engine
        return {"status": "ok", "running": engine.running, "waiting": len(engine.waiting), "replica": replica}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("loramix").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/info")
    async def info(request: Request):
        mixture, _ = ready(request)
        return {
            "experts": mixture.expert_names,
            "defaults": asdict(settings.default_options()),
            "max_new_tokens_limit": settings.max_new_tokens_limit,
            "base_model": getattr(getattr(mixture, "bundle", None), "base_model", None),
            "needs_api_key": settings.api_key is not None,
            "hidden_layers": mixture.hidden_router.n_layers if getattr(mixture, "hidden_router", None) else None,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        mixture, _ = ready(request)
        names = [MODEL, f"{MODEL}:base"] + [f"{MODEL}:{e}" for e in mixture.expert_names]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "loramix"} for n in names]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        mixture, worker = ready(request)
        body = parse_request(CompletionRequest, await request.body())
        prompts = _prompts_of(body.prompt)
        options = options_for(body, mixture.expert_names, state.limits, default_max=16)
        seqs = _sequences(mixture, worker, [(p, o) for p in prompts for o in options])
        return await _respond(request, "completion", body, mixture, worker, seqs)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        mixture, worker = ready(request)
        body = parse_request(ChatRequest, await request.body())
        prompt_ids = _chat_prompt(mixture.tokenizer, body)
        options = options_for(body, mixture.expert_names, state.limits, default_max=settings.max_new_tokens_limit)
        seqs = _sequences(mixture, worker, [(prompt_ids, o) for o in options])
        return await _respond(request, "chat", body, mixture, worker, seqs)

    async def _respond(request, kind, body, mixture, worker, seqs):
        queue = worker.submit(seqs)
        state.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in seqs))
        if body.stream:
            state.metrics.requests.labels(request.url.path, "200").inc()
            chunks = _stream(kind, body, mixture, worker, seqs, queue)
            return StreamingResponse(chunks, media_type="text/event-stream")
        collected = {seq.index: [] for seq in seqs}
        unfinished = set(collected)
        try:
            while unfinished:
                try:
                    what, item = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if what == "error":
                    raise item
                collected[item.sequence].append(item)
                if item.finished:
                    unfinished.discard(item.sequence)
        finally:
            worker.cancel([seq for seq in seqs if seq.index in unfinished])
        state.metrics.requests.labels(request.url.path, "200").inc()
        return _full_response(kind, body, mixture, seqs, collected)

    async def _stream(kind, body, mixture, worker, seqs, queue) -> AsyncIterator[str]:
        response_id, created = new_id("cmpl" if kind == "completion" else "chatcmpl"), now()
        position = {seq.index: i for i, seq in enumerate(seqs)}
        holdbacks = {seq.index: StopHoldback(seq.options.stop) for seq in seqs}
        unfinished = set(position)
        names = mixture.expert_names
        try:
            if kind == "chat":
                for i in range(len(seqs)):
                    yield _sse(_chunk(kind, response_id, created, body.model, i, {"role": "assistant", "content": ""}))
            while unfinished:
                what, event = await queue.get()
                if what == "error":
                    yield _sse(event.body())
                    return
                seq, index = seqs[position[event.sequence]], position[event.sequence]
                holdback = holdbacks[event.sequence]
                text = holdback.feed(event.text, event.finish_reason == "stop")
                if event.finished:
                    text += holdback.flush() if event.finish_reason != "stop" else ""
                    unfinished.discard(event.sequence)
                choice_extra = {}
                if body.return_routing:
                    choice_extra["routing"] = [routing_of_token(event, event.text, names)]
                if event.logprob is not None:
                    choice_extra["logprobs"] = _token_logprobs(kind, [event], mixture.tokenizer)
                chunk = _chunk(
                    kind, response_id, created, body.model, index, {"content": text} if kind == "chat" else text,
                    finish_reason(seq) if event.finished else None, choice_extra,
                )  # fmt: skip
                if not unfinished:
                    chunk["usage"] = usage(seqs)
                yield _sse(chunk)
            if body.stream_options and body.stream_options.get("include_usage"):
                object_name = "chat.completion.chunk" if kind == "chat" else "text_completion"
                yield _sse(
                    {"id": response_id, "object": object_name, "created": created, "model": body.model,
                     "choices": [], "usage": usage(seqs)}
                )  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:
            worker.cancel([seq for seq in seqs if seq.index in unfinished])

    def _full_response(kind, body, mixture, seqs, collected) -> dict:
        tokenizer, names = mixture.tokenizer, mixture.expert_names
        choices = []
        for i, seq in enumerate(seqs):
            text = seq.result(tokenizer, {}).text
            choice = {"index": i, "finish_reason": finish_reason(seq)}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = (seq.prompt + text) if body.echo else text
            events = collected[seq.index]
            choice["logprobs"] = _token_logprobs(kind, events, tokenizer) if seq.options.logprobs is not None else None
            if body.return_routing:
                choice["routing"] = routing_trace(seq, tokenizer, names)
            choices.append(choice)
        return {
            "id": new_id("chatcmpl" if kind == "chat" else "cmpl"),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": now(),
            "model": body.model,
            "choices": choices,
            "usage": usage(seqs),
        }

    return app


def _prompts_of(prompt) -> list:
    """A completions `prompt` (text, texts, token ids, lists of token ids) -> a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "The prompt is empty; give some text to continue.", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def _chat_prompt(tokenizer, body: ChatRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "This base model has no chat template; use /v1/completions.", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if not any(m["content"].strip() for m in messages):
        raise ApiError(400, "The messages are empty; give some text to answer.", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - templates raise whatever they like (e.g. on a role they refuse)
        raise ApiError(400, f"The chat template refused these messages: {exc}", "messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def _sequences(mixture, worker: EngineWorker, prompts_and_options) -> list[SequenceState]:
    try:
        return [mixture.new_sequence(p, o, worker.next_index()) for p, o in prompts_and_options]
    except LoramixError as exc:
        message = str(exc)
        code = "context_length_exceeded" if "context" in message else None  # OpenAI's code for it
        raise ApiError(400, message, param_named_in(message), code) from None


def _chunk(kind, response_id, created, model, index, content, reason=None, extra=None) -> dict:
    if kind == "chat":
        choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": reason}
        object_name = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": content, "logprobs": None, "finish_reason": reason}
        object_name = "text_completion"
    choice.update(extra or {})
    return {"id": response_id, "object": object_name, "created": created, "model": model, "choices": [choice]}


def _token_logprobs(kind: str, events: list[TokenEvent], tokenizer) -> dict:
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    if kind == "chat":
        content = []
        for e in events:
            token = text(e.token_id)
            top = [
                {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())} for t, lp in (e.top_logprobs or [])
            ]
            content.append({"token": token, "logprob": e.logprob, "bytes": list(token.encode()), "top_logprobs": top})
        return {"content": content}
    tokens = [text(e.token_id) for e in events]
    offsets = list(itertools.accumulate([0] + [len(t) for t in tokens[:-1]]))
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [{text(t): lp for t, lp in e.top_logprobs} if e.top_logprobs else None for e in events],
        "text_offset": offsets,
    }


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def serve(settings: ServeSettings) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
