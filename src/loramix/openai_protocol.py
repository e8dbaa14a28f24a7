"""The OpenAI API's requests as typed models (vLLM's `protocol.py` pattern): each request validates itself, is
described in /openapi.json and /docs, and turns into generation options with `to_options()`. Errors are answered
in OpenAI's shape, naming the request field they are about.

Model names: `loramix` (token-level routing, the server's defaults), `loramix:base` (experts off) and
`loramix:<expert>` (one expert). loramix's own fields: `every_k`, `route`, `merge`, `decode`, `return_routing`,
`min_tokens`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramix.errors import LoramixError, OptionError
from loramix.mixture import MERGE_ALIASES, MERGE_MODES
from loramix.sequences import DECODE_MODES, MAX_LOGPROBS, GenerationOptions

MODEL = "loramix"
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_CHOICES = 16
MERGE_NAMES = MERGE_MODES + tuple(MERGE_ALIASES)
# GenerationOptions fields the API calls otherwise
REQUEST_FIELD = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers  # e.g. Retry-After on a 429 or 503

    @property
    def kind(self) -> str:
        return {
            400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable",
        }.get(self.status, "server_error")  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def from_option(cls, exc: OptionError) -> ApiError:
        """A refused setting as a 400 naming the request field (a too-long prompt gets OpenAI's own code)."""
        param = REQUEST_FIELD.get(exc.field, exc.field)
        code = "context_length_exceeded" if "context" in exc.worded(param) and param == "max_tokens" else None
        return cls(400, exc.worded(f"'{param}'"), param, code)


def api_errors(exc: LoramixError) -> ApiError:
    if isinstance(exc, OptionError):
        return ApiError.from_option(exc)
    return ApiError(400, str(exc))


Text = Annotated[str, Field(min_length=1)]
Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # strict: "5" is not a number and true is not 1; unknown fields are ignored, as OpenAI-compatible servers do
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(description="`loramix` (token-level routing), `loramix:base`, or `loramix:<expert>`.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens (newer name).")
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="0 (or below 1e-5) is greedy.")
    top_p: Probability = 1.0
    seed: int | None = Field(default=None, description="Sampling seed; choice i of n uses seed + i.")
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    # loramix's own fields
    every_k: int | None = Field(default=None, ge=1, description="Re-route every k generated tokens.")
    route: str | None = Field(default=None, description="Routing rule, e.g. hidden, paper, top1, prompt:top1.")
    merge: Literal[MERGE_NAMES] | None = Field(
        default=None, description="How the experts' deltas combine: exact, linear or peft04."
    )
    decode: Literal[DECODE_MODES] | None = Field(default=None, description="cached, or recompute after re-routes.")
    return_routing: bool = Field(default=False, description="Return each token's expert weights.")
    min_tokens: int = Field(default=0, ge=0, description="End-of-sequence is suppressed before this many tokens.")

    def logprobs_wanted(self) -> int | None:
        return None

    def to_options(self, expert_names: list[str], limits: ServerLimits, default_max: int) -> list[GenerationOptions]:
        """One GenerationOptions per choice (n of them; seeds differ when sampling), checked."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max
        if max_tokens > limits.max_new_tokens:
            raise ApiError(
                400, f"max_tokens is {max_tokens}, over this server's limit of {limits.max_new_tokens}.", "max_tokens"
            )
        if self.temperature > 0 and self.seed is None:
            seed = random.randrange(2**31)  # unseeded sampling differs between requests, as users expect
        else:
            seed = self.seed
        base = limits.default_options
        first = replace(
            base,
            every_k=self.every_k if self.every_k is not None else base.every_k,
            route=route_of_model(self.model, expert_names, self.route) or base.route,
            decode=self.decode or base.decode,
            merge=self.merge or base.merge,
            max_new_tokens=max_tokens,
            min_new_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            logprobs=self.logprobs_wanted(),
        )
        try:
            first.validate()
        except OptionError as exc:
            raise ApiError.from_option(exc) from None
        return [first if i == 0 or seed is None else replace(first, seed=seed + i) for i in range(self.n)]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids, or lists of token ids."
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token.")
    echo: bool = False

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list:
        """The prompt as a list of prompts (each text or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise ApiError(400, "The prompt is empty; give some text to continue.", "prompt")
        if isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


@dataclass(frozen=True)
class ServerLimits:
    max_new_tokens: int  # largest max_tokens a request may ask for
    default_options: GenerationOptions  # the server's defaults for the `loramix` model


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


# pydantic names the member of a union it tried ("prompt.str", "stop.list[...]"): the field is what the user wrote
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "function-after", "function-plain", "none", "literal"}


def _field_of(error: dict) -> str | None:
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    loc = [p for p in loc if not (p in _TYPE_TAGS or "[" in p or p.startswith(("literal", "constrained-")))]
    return ".".join(loc) or None


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's request validation errors -> one 400 naming the first field at fault (from the validation itself).
    A field of several accepted types reports one error per type; the one that is not a type mismatch is the
    one that says what is wrong (e.g. a list of stop strings that is too long, not that it is not a string)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}.")
    param = _field_of(first)
    if param is None:
        return ApiError(400, f"The request body must be a JSON object: {first['msg']}.")
    same = [e for e in errors if (_field_of(e) or "").startswith(param)]
    telling = [e for e in same if not str(e.get("type", "")).endswith("_type")] or same
    param = _field_of(telling[0])
    return ApiError(400, f"Invalid '{param}': {telling[0]['msg']}.", param)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "Invalid request: `param` names the field"), (401, "Missing or wrong API key"),
        (404, "Unknown model"), (429, "Queue full; see Retry-After"),
        (500, "This request failed; others were not affected"),
        (503, "Loading, or shutting down; see Retry-After"),
    )
}  # fmt: skip
