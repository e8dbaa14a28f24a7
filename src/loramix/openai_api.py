"""The OpenAI API's shapes: requests parsed into generation options, responses and stream chunks built from
sequences, errors in OpenAI's shape. No HTTP here (that is `loramix.server`), so it is tested directly.

Model names: `loramix` (token-level routing, the bundle's defaults), `loramix:base` (experts off) and
`loramix:<expert>` (one expert). Extra request fields: `every_k`, `route`, `merge`, `decode`, `return_routing`.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loramix.errors import LoramixError
from loramix.sequences import GenerationOptions, SequenceState, TokenEvent

MODEL = "loramix"
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_CHOICES = 16


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {
            400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable",
        }.get(self.status, "server_error")  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # strict: "5" is not a number and true is not 1; unknown fields are ignored, as OpenAI-compatible servers do
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    # loramix's own fields
    every_k: int | None = None
    route: str | None = None
    merge: str | None = None
    decode: str | None = None
    return_routing: bool = False
    min_tokens: int = Field(default=0, ge=0)  # as vLLM: end-of-sequence is suppressed before this many tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "Only text content parts are supported.", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "function-after", "function-plain"}


def parse_request(kind: type[_Request], raw: bytes) -> _Request:
    """Bytes of a request body -> the request, or an ApiError naming what is wrong (400)."""
    import json

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not UTF-8; send JSON encoded as UTF-8.") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic names the member of a union it tried ("prompt.str"): the field is what the user wrote
        loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
        param = ".".join(loc) or None
        raise ApiError(400, f"Invalid '{param}': {first['msg']}.", param) from None


@dataclass(frozen=True)
class ServerLimits:
    max_new_tokens: int  # largest max_tokens a request may ask for
    default_options: GenerationOptions  # the bundle's defaults for the `loramix` model


def route_of_model(model: str, expert_names: list[str], route: str | None) -> str | None:
    """The route a model name stands for (None: the request's own, or the default)."""
    if model == MODEL:
        return route
    name, sep, expert = model.partition(":")
    if name != MODEL or not sep:
        raise ApiError(404, f"The model '{model}' does not exist; see GET /v1/models.", "model", "model_not_found")
    if route is not None:
        raise ApiError(400, f"The model '{model}' fixes the route; send model 'loramix' with 'route'.", "route")
    if expert == "base":
        return "base"
    if expert not in expert_names:
        raise ApiError(404, f"The model '{model}' does not exist; see GET /v1/models.", "model", "model_not_found")
    return f"oracle:{expert}"


def options_for(request: _Request, expert_names: list[str], limits: ServerLimits, default_max: int) -> list:
    """One GenerationOptions per choice (n of them; seeds differ when sampling)."""
    base = limits.default_options
    max_tokens = request.max_completion_tokens or request.max_tokens or default_max
    if max_tokens > limits.max_new_tokens:
        raise ApiError(
            400, f"max_tokens is {max_tokens}, over this server's limit of {limits.max_new_tokens}.", "max_tokens"
        )
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings.", "stop")
    if request.temperature > 0 and request.seed is None:
        seed = random.randrange(2**31)  # unseeded sampling differs between requests, as users expect
    else:
        seed = request.seed
    route = route_of_model(request.model, expert_names, request.route)
    logprobs = _logprobs_wanted(request)
    choices = []
    for i in range(request.n):
        choices.append(
            GenerationOptions(
                every_k=request.every_k if request.every_k is not None else base.every_k,
                route=route or base.route,
                decode=request.decode or base.decode,
                merge=request.merge or base.merge,
                max_new_tokens=max_tokens,
                min_new_tokens=request.min_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=None if seed is None else seed + i,
                stop=tuple(stops),
                logprobs=logprobs,
            )
        )
    try:
        choices[0].validate()
    except LoramixError as exc:
        raise ApiError(400, str(exc), param_named_in(str(exc))) from None
    return choices


def _logprobs_wanted(request: _Request) -> int | None:
    if isinstance(request, ChatRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def param_named_in(message: str) -> str | None:
    """The request field a LoramixError's message is about (its wording names the CLI option)."""
    for option, param in (
        ("Prompt ", "prompt"),        ("--every-k", "every_k"), ("--temperature", "temperature"), ("--top-p", "top_p"),
        ("merge mode", "merge"),
        ("decode mode", "decode"), ("logprobs", "logprobs"), ("--max-new-tokens", "max_tokens"), ("Route", "route"),
        ("route", "route"), ("--seed", "seed"), ("Stop", "stop"),
        ("--min-new-tokens", "min_tokens"),
    ):  # fmt: skip
        if option in message:
            return param
    return None


# ---- responses ----


def finish_reason(seq: SequenceState) -> str:
    return "length" if seq.finish_reason == "length" else "stop"


def usage(sequences: list[SequenceState]) -> dict:
    prompt = len(sequences[0].prompt_ids) if sequences else 0
    completion = sum(len(s.token_ids) for s in sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def routing_of_token(event: TokenEvent, text: str, expert_names: list[str]) -> dict:
    return {
        "token": text,
        "weights": {name: round(w, 6) for name, w in zip(expert_names, event.weights)},
        "rerouted": event.rerouted,
    }


def routing_trace(seq: SequenceState, tokenizer, expert_names: list[str]) -> dict:
    """The whole per-token trace of a finished sequence."""
    return {
        "experts": expert_names,
        "tokens": [tokenizer.decode([t], skip_special_tokens=True) for t in seq.token_ids],
        "weights": [[round(w, 6) for w in row.tolist()] for row in seq.weight_rows],
        "reroutes": seq.reroutes,
        "frozen_reroutes": seq.frozen,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class StopHoldback:
    """Streams a sequence's text without ever sending a stop string: text that could still be the start of
    one is held back until the next token decides it. What it sends adds up to the non-streamed text."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.sent = ""

    def feed(self, piece: str, finished_by_stop: bool) -> str:
        self.pending += piece
        if finished_by_stop:
            text = self.sent + self.pending
            cut = min(text.find(s) for s in self.stops if s in text)
            out = text[len(self.sent) : cut] if cut >= len(self.sent) else ""
            self.sent += out
            self.pending = ""
            return out
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    keep = max(keep, size)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        self.sent += out
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.sent += out
        return out
