"""`loramix serve`: the OpenAI API over one continuous-batching engine, with a live routing view at `/`.

The app only routes: requests are typed (`loramix.openai_protocol`), served by `loramix.openai_serving`, and run
by the engine's own thread (`loramix.worker`). The model loads in the background: /health answers 503 until then.

Shutdown (SIGTERM, Ctrl-C) drains: new requests get 503 with Retry-After, running ones finish for up to
--shutdown-timeout seconds, what is left then ends with a final error event, and the process exits 0.
A second Ctrl-C stops at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramix.engine import Engine
from loramix.errors import OptionError
from loramix.hardware import Placement
from loramix.mixture import DEFAULT_MERGE
from loramix.openai_protocol import (
    ERROR_RESPONSES,
    MODEL,
    ApiError,
    ChatRequest,
    CompletionRequest,
    ServerLimits,
    validation_error,
)
from loramix.openai_serving import OpenAIServing
from loramix.options import option
from loramix.router import DEFAULT_EVERY_K, DEFAULT_ROUTE, ROUTE_HELP, parse_route
from loramix.sequences import DEFAULT_DECODE, GenerationOptions
from loramix.telemetry import ServerMetrics
from loramix.worker import EngineWorker

# seconds a step's prefill work may take while other sequences decode: their gap between tokens stays under ~1 s
PREFILL_SECONDS = 0.5
KV_MEMORY_SHARE = 0.5  # of the memory free once the model is loaded, for the running batch's KV cache


@dataclass(frozen=True)
class ServeSettings(Placement):
    """Everything `loramix serve` can be told; the command's flags, defaults and help come from here."""

    bundle: str | None = option(None, "Bundle folder (default: the trained default bundle).")
    host: str = option("127.0.0.1", "Address to bind; loopback unless told otherwise.")
    port: int = option(8000, "TCP port.")
    api_key: str | None = option(None, "Require 'Authorization: Bearer KEY' on /v1/* (default: $LORAMIX_API_KEY).")
    max_batch: int = option(16, "Sequences admitted together (prefilling or decoding); more wait in the queue.")
    max_queue: int = option(64, "Sequences waiting beyond the batch; more are answered 429.")
    max_new_tokens_limit: int = option(512, "Largest max_tokens a request may ask for.")
    max_batch_tokens: int | None = option(
        None, "KV-cache budget in tokens: rows x their longest prompt + max_tokens (default: half the free memory)."
    )
    prefill_chunk: int | None = option(
        None, "Prompt tokens prefilled between two decode steps (default: adapted as it runs, ~0.5 s of work a step)."
    )
    shutdown_timeout: float = option(30.0, "Seconds running requests may take to finish on SIGTERM / Ctrl-C.")
    merge: str = option(DEFAULT_MERGE, "Merge mode of requests that set none.")
    every_k: int = option(DEFAULT_EVERY_K, "Default re-route interval.")
    route: str = option(DEFAULT_ROUTE, "Default route of the 'loramix' model: " + ROUTE_HELP)
    decode: str = option(DEFAULT_DECODE, "Default decode mode.")
    embedder_dtype: str = option("auto", "Router embedder precision: fp32, bf16 or auto.")

    def check(self, expert_names: list[str] | None = None) -> None:
        """Refuse settings that cannot serve; the route is checked once the experts' names are known."""
        for name in ("max_batch", "max_queue", "max_new_tokens_limit", "prefill_chunk", "max_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError(name, f"must be at least 1, got {value}.")
        if self.shutdown_timeout < 0:
            raise OptionError("shutdown_timeout", f"must not be negative, got {self.shutdown_timeout}.")
        if not 0 < self.port < 65536:
            raise OptionError("port", f"must be between 1 and 65535, got {self.port}.")
        self.default_options().validate()
        if expert_names is not None:
            parse_route(self.route, expert_names)

    def default_options(self) -> GenerationOptions:
        return GenerationOptions(every_k=self.every_k, route=self.route, decode=self.decode, merge=self.merge)


def kv_budget(mixture, share: float = KV_MEMORY_SHARE) -> int:
    """Tokens of KV cache that fit in `share` of the memory free now (the GPU's, or the machine's)."""
    config = mixture.model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * heads * head_dim * mixture.dtype.itemsize
    return max(1, int(share * free_memory(mixture.device) / per_token))


def free_memory(device) -> int:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # no way to ask: assume a small machine


@dataclass
class ServerState:
    settings: ServeSettings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    mixture: object = None
    worker: EngineWorker | None = None
    serving: OpenAIServing | None = None
    error: str | None = None  # why loading failed
    budget: int | None = None  # the KV-cache budget in force

    @property
    def limits(self) -> ServerLimits:
        return ServerLimits(self.settings.max_new_tokens_limit, self.settings.default_options())

    def start(self, mixture) -> None:
        settings = self.settings
        settings.check(mixture.expert_names)
        mixture.state.check_mode(settings.merge)
        self.budget = settings.max_batch_tokens or kv_budget(mixture)
        engine = Engine(mixture, settings.max_batch, self.budget, settings.prefill_chunk, PREFILL_SECONDS)
        self.mixture = mixture
        self.worker = EngineWorker(engine, settings.max_queue, self.metrics)
        self.serving = OpenAIServing(mixture, self.worker, self.limits, self.metrics)

    def drain(self, timeout: float) -> int:
        """Refuse new requests, let running ones finish for up to `timeout` s, end the rest. Returns how many
        requests were ended unfinished."""
        if self.worker is None:
            return 0
        self.worker.draining = True
        deadline = time.monotonic() + timeout
        while not self.worker.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = self.worker.end_all(ApiError(503, "The server shut down before this request finished; retry it."))
        time.sleep(0.2)  # the streams send their last event before the connections close
        return ended


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
                    settings.bundle, merge=settings.merge, embedder_dtype=settings.embedder_dtype,
                    device=settings.device, dtype=settings.dtype,
                )  # fmt: skip
            state.start(mixture)
        except Exception as exc:  # noqa: BLE001 - reported by /health, the server stays up to say so
            state.error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=load_model, name="loramix-load", daemon=True)
        loader.start()
        yield
        if state.worker is not None:
            state.worker.stop()

    app = FastAPI(title="loramix", version="1", lifespan=lifespan, redoc_url=None,
                  description="The OpenAI API over LoRA experts mixed per token.")  # fmt: skip
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
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """FastAPI's own refusals (an unparsable body, an unknown path, a wrong method) in OpenAI's shape too."""
        detail = exc.detail if isinstance(exc.detail, str) else "Bad request"
        if detail == "There was an error parsing the body":
            detail = "The request body could not be read as JSON (send UTF-8 JSON with content-type application/json)"
        return await api_error(request, ApiError(exc.status_code, f"{detail}.", headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return await api_error(request, validation_error(list(exc.errors())))

    def ready(request: Request) -> OpenAIServing:
        if settings.api_key is not None:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {settings.api_key}":
                raise ApiError(
                    401, "Missing or wrong API key; send 'Authorization: Bearer KEY'.", code="invalid_api_key"
                )
        if state.serving is None:
            message = state.error or "The model is still loading; retry shortly (see GET /health)."
            raise ApiError(503, message, headers=None if state.error else {"Retry-After": "5"})
        return state.serving

    @app.get("/health")
    async def health():
        if state.worker is None:
            status = "failed" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error}, status_code=503)
        engine = state.worker.engine
        status = "draining" if state.worker.draining else "ok"
        body = {"status": status, "running": engine.running, "waiting": len(engine.waiting), "replica": replica}
        return JSONResponse(body, status_code=503 if state.worker.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("loramix").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/info")
    async def info(request: Request):
        serving = ready(request)
        mixture = serving.mixture
        return {
            "experts": mixture.expert_names,
            "defaults": asdict(settings.default_options()),
            "max_new_tokens_limit": settings.max_new_tokens_limit,
            "max_batch_tokens": state.budget,
            "prefill_chunk": settings.prefill_chunk or f"adaptive, {PREFILL_SECONDS} s a step",
            "base_model": getattr(getattr(mixture, "bundle", None), "base_model", None),
            **mixture.placement,
            "needs_api_key": settings.api_key is not None,
            "hidden_layers": mixture.hidden_router.n_layers if getattr(mixture, "hidden_router", None) else None,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        serving = ready(request)
        names = [MODEL, f"{MODEL}:base"] + [f"{MODEL}:{e}" for e in serving.mixture.expert_names]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "loramix"} for n in names]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        serving = ready(request)
        return await _answer(request, "completion", body, serving, serving.completion_sequences(body))

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat(body: ChatRequest, request: Request):
        serving = ready(request)
        return await _answer(request, "chat", body, serving, serving.chat_sequences(body))

    async def _answer(request: Request, kind: str, body, serving: OpenAIServing, seqs):
        answer = await serving.complete(kind, body, seqs, request.is_disconnected)
        if answer is None:  # the client went away
            return JSONResponse({}, status_code=499)
        state.metrics.requests.labels(request.url.path, "200").inc()
        if body.stream:
            return StreamingResponse(answer, media_type="text/event-stream")
        return answer

    def openapi() -> dict:
        """FastAPI's schema, with validation errors documented as what this server answers: 400, OpenAI's shape."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def serve(settings: ServeSettings) -> None:
    """Run the server until SIGTERM or Ctrl-C, then drain (see the module docstring) and return."""
    import uvicorn

    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        """uvicorn stops listening on the first signal; this one keeps answering (503 to newcomers) while the
        running requests finish, and only then lets uvicorn shut down."""

        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining:  # a second signal: stop now
                self.force_exit = True
                self.should_exit = True
                return
            self.draining = True
            threading.Thread(target=self._drain_then_exit, name="loramix-drain", daemon=True).start()

        def _drain_then_exit(self) -> None:
            app.state.loramix.drain(settings.shutdown_timeout)
            self.should_exit = True

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=5)  # fmt: skip
    DrainingServer(config).run()
