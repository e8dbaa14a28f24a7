"""One generated sequence: its options, its routing memory, its tokens, and how it picks and ends them.

Everything that belongs to one request lives here, so any number of sequences can share one model and
one decoding batch (`loramix.engine`) without disturbing each other: each has its own sampling generator,
re-route schedule, routing memory (the router's reusable embedding) and weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from loramix.errors import LoramixError, OptionError
from loramix.mixture import canonical_merge
from loramix.options import option
from loramix.router import DEFAULT_EVERY_K, DEFAULT_ROUTE, ROUTE_HELP, RouteMemory, RoutePolicy, parse_route

DECODE_MODES = ("cached", "recompute")
DEFAULT_DECODE = "cached"
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows


@dataclass(frozen=True)
class GenerationOptions:
    every_k: int = option(DEFAULT_EVERY_K, "Re-route every k generated tokens.")
    route: str = option(DEFAULT_ROUTE, ROUTE_HELP)
    decode: str = option(DEFAULT_DECODE, "cached (keep the KV cache) or recompute (re-run the text at re-routes).")
    max_new_tokens: int = option(128, "Most tokens to generate.")
    min_new_tokens: int = option(0, "End-of-sequence is suppressed before this many tokens.")
    temperature: float = option(0.0, "0 = greedy; otherwise sample.")
    top_p: float = option(1.0, "Nucleus sampling mass.")
    seed: int | None = option(None, "Sampling seed.")
    stop: tuple[str, ...] = option((), "Stop string, repeatable.")
    merge: str | None = option(None, "exact, linear (PEFT >= 0.7) or peft04 (PEFT 0.4.0); default: the model's.")
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: and the N likeliest alternatives
    # token ids whose log-probability as the FIRST generated token is reported (e.g. option letters)
    first_token_candidates: tuple[int, ...] = ()
    # teacher forcing: emit exactly these tokens instead of choosing (gold-answer loss with routing as generation
    # would do it); their log-probabilities are recorded, and the sequence ends after the last one
    forced: tuple[int, ...] = ()

    def validate(self) -> None:
        """Refuse settings that cannot run, naming the field and the fix (before anything is generated)."""

        def whole(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionError(name, f"must be a whole number, got {value!r}.")

        for name in ("every_k", "max_new_tokens", "min_new_tokens"):
            whole(name)
        if self.every_k <= 0:
            raise OptionError("every_k", f"must be a positive number of tokens, got {self.every_k}.")
        if self.decode not in DECODE_MODES:
            raise OptionError("decode", sentence=f"Unknown decode mode '{self.decode}'; choose one of "
                              f"{', '.join(DECODE_MODES)}.")  # fmt: skip
        if self.merge is not None:
            try:
                canonical_merge(self.merge)
            except LoramixError as exc:
                raise OptionError("merge", sentence=str(exc)) from None
        if self.max_new_tokens <= 0:
            raise OptionError("max_new_tokens", f"must be positive, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise OptionError("min_new_tokens", "must be between 0 and the most new tokens (max_new_tokens).")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise OptionError("temperature", f"must be 0 (greedy) or a positive number, got {self.temperature!r}.")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be in (0, 1], got {self.top_p!r}.")
        if self.seed is not None:
            whole("seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise OptionError("stop", "takes non-empty text only.")
        if self.forced and len(self.forced) != self.max_new_tokens:
            raise OptionError("forced", "takes exactly max_new_tokens tokens.")
        if self.logprobs is not None:
            whole("logprobs")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise OptionError("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}.")


@dataclass
class GenerationResult:
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    tokens: list[str]
    weights: torch.Tensor  # [n_tokens, n_experts]: the weights that produced each generated token
    reroutes: list[int]  # indices of generated tokens at which the router ran
    frozen_reroutes: int  # re-routes whose text filled the embedder's input limit (256 word pieces for MiniLM)
    reused_embeddings: int  # re-routes whose embedder input was unchanged, so the last embedding was reused
    finish_reason: str  # "eos", "stop" or "length"
    timing: dict[str, float]  # of the batch this sequence ran in
    first_token_logprobs: list[float] | None = None  # for options.first_token_candidates, in their order
    logprobs: list[float] | None = None  # of each generated token (options.logprobs set)

    def to_json(self, expert_names: Sequence[str]) -> dict:
        return {
            "experts": list(expert_names),
            "prompt_token_ids": self.prompt_token_ids,
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "weights": [[round(w, 6) for w in row] for row in self.weights.tolist()],
            "reroutes": self.reroutes,
            "frozen_reroutes": self.frozen_reroutes,
            "reused_embeddings": self.reused_embeddings,
            "finish_reason": self.finish_reason,
            "timing": {k: round(v, 6) for k, v in self.timing.items()},
        }


@dataclass
class TokenEvent:
    """One generated token, as streamed."""

    sequence: int  # the sequence's index (its position in the call, or its request number)
    index: int  # position among that sequence's generated tokens
    token_id: int
    text: str  # the text this token adds (may be "" until a multi-byte character completes)
    weights: list[float]
    rerouted: bool
    finished: bool
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), likeliest first
    error: str | None = None  # finish_reason "error": why this sequence alone was ended


class IncrementalDetokenizer:
    """Decodes one token at a time in O(1) per token, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        piece = decode(self.ids[self.prefix :], skip_special_tokens=True)[len(before) :]
        self.prefix = self.read = len(self.ids)
        self.text += piece
        return piece


@dataclass(eq=False)  # compared by identity: a sequence is one request, whatever its contents
class SequenceState:
    """One sequence being generated; owned by its caller, stepped by an engine."""

    index: int
    prompt: str
    prompt_ids: list[int]
    options: GenerationOptions
    policy: RoutePolicy
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    memory: RouteMemory = field(default_factory=RouteMemory)
    hidden_sum: torch.Tensor | None = None  # hidden routing: sum of the layer-L states of the tokens processed
    hidden_count: int = 0
    weights: torch.Tensor | None = None  # [n_experts] now in force, None = experts off
    prior: torch.Tensor | None = None  # in-layer routing: [n_experts] each layer's prior (flat, or the prompt's)
    token_ids: list[int] = field(default_factory=list)
    weight_rows: list[torch.Tensor] = field(default_factory=list)
    reroutes: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    frozen: int = 0
    reused: int = 0
    finish_reason: str | None = None
    first_token_logprobs: list[float] | None = None
    cancelled: bool = False
    error: str | None = None  # why this sequence failed (finish_reason "error")

    def __post_init__(self):
        self.memory.sliding = self.policy.window is not None
        if self.options.temperature > 0 and self.generator is None:
            seed = self.options.seed if self.options.seed is not None else 0
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def step(self) -> int:
        """Index of the next token to generate."""
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def reroutes_at(self, step: int) -> bool:
        """Whether the router runs before generated token `step` (fixed policies never run it)."""
        if not self.policy.needs_router:
            return False
        if step == 0:
            return True
        return self.policy.kind == "dynamic" and step % self.options.every_k == 0

    def banned_tokens(self, eos_ids: Sequence[int]) -> Sequence[int]:
        """Token ids this sequence may not pick next: end-of-sequence before min_new_tokens."""
        return eos_ids if self.step < self.options.min_new_tokens else ()

    def fail(self, message: str) -> TokenEvent:
        """End this sequence alone with an error (the others in its batch go on)."""
        self.error = message
        self.finish_reason = "error"
        return TokenEvent(self.index, self.step, -1, "", [], False, True, "error", error=message)

    def reservation(self) -> int:
        """The KV-cache tokens this sequence may come to hold: its prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.options.max_new_tokens

    def append(self, token_id: int, eos_ids: Sequence[int], rerouted: bool) -> TokenEvent:
        """Record the chosen token, decide whether the sequence ends, and describe it as an event."""
        step = self.step
        row = self.weights if self.weights is not None else torch.zeros(self.policy.n_experts)
        self.token_ids.append(token_id)
        self.weight_rows.append(row)
        if rerouted:
            self.reroutes.append(step)
        piece = self.detokenizer.add(token_id)
        self.finish_reason = self._finish_reason(token_id, piece, eos_ids)
        if self.finish_reason is not None:
            piece += self.detokenizer.flush()
        return TokenEvent(
            self.index, step, token_id, piece, row.tolist(), rerouted, self.finish_reason is not None,
            self.finish_reason,
        )  # fmt: skip

    def _finish_reason(self, token_id: int, piece: str, eos_ids: Sequence[int]) -> str | None:
        if token_id in eos_ids:
            return "eos"
        stops = self.options.stop
        if stops and piece:
            tail = self.detokenizer.text[-(len(piece) + max(len(s) for s in stops)) :]
            if any(stop in tail for stop in stops):
                return "stop"
        if self.step >= self.options.max_new_tokens:
            return "length"
        return None

    def result(self, tokenizer, timing: dict[str, float]) -> GenerationResult:
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.finish_reason == "stop":
            text = cut_at_stop(text, self.options.stop)
        n_experts = self.policy.n_experts
        return GenerationResult(
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            text=text,
            token_ids=self.token_ids,
            tokens=tokenizer.convert_ids_to_tokens(self.token_ids),
            weights=torch.stack(self.weight_rows) if self.weight_rows else torch.zeros(0, n_experts),
            reroutes=self.reroutes,
            frozen_reroutes=self.frozen,
            reused_embeddings=self.reused,
            finish_reason=self.finish_reason or "length",
            timing=timing,
            first_token_logprobs=self.first_token_logprobs,
            logprobs=self.token_logprobs if self.options.logprobs is not None else None,
        )


def new_sequence(mixture, prompt: str | list[int], options: GenerationOptions, index: int = 0) -> SequenceState:
    """One sequence to generate on `mixture` (a RoutedModel), checked before any work: options, route, merge mode,
    prompt, context. `prompt` is text, or token ids (their text is decoded for routing and results)."""
    options.validate()
    policy = parse_route(options.route, mixture.expert_names)
    if policy.needs_text_router and mixture.router is None:
        raise OptionError("route", sentence=f"Route '{options.route}' needs the router, but this model was loaded "
                          "without one.")  # fmt: skip
    if policy.hidden_layer is not None:
        if mixture.hidden_router is None:
            raise OptionError("route", sentence=(
                f"Route '{options.route}' needs the bundle's hidden-state centroids (router_hidden.safetensors); "
                "build them with `loramix router hidden BUNDLE`, or choose a text route such as --route boost."
            ))  # fmt: skip
        layers = mixture.hidden_router.n_layers
        if not -layers <= policy.hidden_layer <= layers:
            raise OptionError("route", sentence=f"Route '{options.route}': this base model has {layers} layers.")
        if policy.hidden_layer < 0:  # counted back from the last layer
            policy = replace(policy, hidden_layer=layers + 1 + policy.hidden_layer)
    if options.merge is not None:
        options = replace(options, merge=canonical_merge(options.merge))  # one lane per merge mode, not per name
        try:
            mixture.state.check_mode(options.merge)
        except LoramixError as exc:
            raise OptionError("merge", sentence=str(exc)) from None
    if policy.layer_rule is not None and (options.merge or mixture.merge) != "exact":
        raise OptionError("route", sentence=f"Route '{options.route}' routes inside each layer, which only the "
                          "exact merge mode can do; use --merge exact.")  # fmt: skip
    tokenizer = mixture.tokenizer
    if isinstance(prompt, str):
        if not prompt.strip():
            raise OptionError("prompt", sentence=f"Prompt {index} is empty; give some text to continue.")
        prompt_ids = tokenizer(prompt).input_ids
    else:
        prompt_ids = list(prompt)
        if not prompt_ids:
            raise OptionError("prompt", sentence=f"Prompt {index} has no tokens; give some text to continue.")
        vocabulary = len(tokenizer)
        if any(not 0 <= t < vocabulary for t in prompt_ids):
            raise OptionError("prompt", sentence=f"Prompt {index} has token ids outside the vocabulary "
                              f"(0..{vocabulary - 1}).")  # fmt: skip
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    try:
        mixture.check_context(len(prompt_ids), options.max_new_tokens)
    except LoramixError as exc:  # the prompt is what it is: the fix the message offers is fewer new tokens
        raise OptionError("max_new_tokens", sentence=str(exc)) from None
    return SequenceState(index, prompt, prompt_ids, options, policy, IncrementalDetokenizer(tokenizer))


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string it contains."""
    found = [text.find(stop) for stop in stops if stop in text]
    return text[: min(found)] if found else text
