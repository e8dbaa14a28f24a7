"""Serving one OpenAI request: its sequences into the engine, their tokens back as a response or as stream chunks.

No HTTP here (that is `loramix.server`): `OpenAIServing.complete()` takes a typed request and gives a dict (the
whole response) or an async iterator of server-sent-event lines.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from loramix.errors import LoramixError
from loramix.openai_protocol import ApiError, ChatRequest, CompletionRequest, ServerLimits, api_errors
from loramix.sequences import SequenceState, TokenEvent, new_sequence


class OpenAIServing:
    """Builds sequences from requests, and responses and chunks from their tokens."""

    def __init__(self, mixture, worker, limits: ServerLimits, metrics):
        self.mixture = mixture
        self.worker = worker
        self.limits = limits
        self.metrics = metrics

    # ---- requests -> sequences ----

    def completion_sequences(self, request: CompletionRequest) -> list[SequenceState]:
        prompts = request.prompts()
        options = request.to_options(self.mixture.expert_names, self.limits, default_max=16)
        return self._sequences([(p, o) for p in prompts for o in options])

    def chat_sequences(self, request: ChatRequest) -> list[SequenceState]:
        prompt_ids = self._chat_prompt(request)
        options = request.to_options(self.mixture.expert_names, self.limits, self.limits.max_new_tokens)
        return self._sequences([(prompt_ids, o) for o in options])

    def _sequences(self, prompts_and_options) -> list[SequenceState]:
        try:
            return [new_sequence(self.mixture, p, o, self.worker.next_index()) for p, o in prompts_and_options]
        except LoramixError as exc:
            raise api_errors(exc) from None

    def _chat_prompt(self, request: ChatRequest) -> list[int]:
        tokenizer = self.mixture.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "This base model has no chat template; use /v1/completions.", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        if not any(m["content"].strip() for m in messages):
            raise ApiError(400, "The messages are empty; give some text to answer.", "messages")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - templates raise whatever they like (e.g. on a role they refuse)
            raise ApiError(400, f"The chat template refused these messages: {exc}", "messages") from None
        return tokenizer(text, add_special_tokens=False).input_ids

    # ---- running ----

    async def complete(self, kind: str, request, seqs: list[SequenceState], disconnected: Callable[[], Awaitable]):
        """The whole response (a dict), or for `stream` an async iterator of SSE lines."""
        queue = self.worker.submit(seqs)
        self.metrics.prompt_tokens.inc(prompt_tokens(seqs, request.n))
        if request.stream:
            return self._stream(kind, request, seqs, queue)
        collected = {seq.index: [] for seq in seqs}
        unfinished = set(collected)
        try:
            while unfinished:
                try:
                    what, item = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await disconnected():
                        return None
                    continue
                if what == "error":
                    raise item
                collected[item.sequence].append(item)
                if item.finished:
                    unfinished.discard(item.sequence)
        finally:
            self.worker.cancel([seq for seq in seqs if seq.index in unfinished])
        return self._full_response(kind, request, seqs, collected)

    async def _stream(self, kind, request, seqs, queue) -> AsyncIterator[str]:
        response_id, created = new_id("cmpl" if kind == "completion" else "chatcmpl"), now()
        position = {seq.index: i for i, seq in enumerate(seqs)}
        holdbacks = {seq.index: StopHoldback(seq.options.stop) for seq in seqs}
        unfinished = set(position)
        names = self.mixture.expert_names
        try:
            if kind == "chat":
                role = {"role": "assistant", "content": ""}
                for i in range(len(seqs)):
                    yield sse(_chunk(kind, response_id, created, request.model, i, role))
            while unfinished:
                what, event = await queue.get()
                if what == "error":  # the stream ends with the error as its last event
                    yield sse(event.body())
                    return
                seq, index = seqs[position[event.sequence]], position[event.sequence]
                holdback = holdbacks[event.sequence]
                text = holdback.feed(event.text, event.finish_reason == "stop")
                if event.finished:
                    text += holdback.flush() if event.finish_reason != "stop" else ""
                    unfinished.discard(event.sequence)
                extra = {}
                if request.return_routing:
                    extra["routing"] = [routing_of_token(event, event.text, names)]
                if event.logprob is not None:
                    extra["logprobs"] = token_logprobs(kind, [event], self.mixture.tokenizer)
                chunk = _chunk(
                    kind, response_id, created, request.model, index, {"content": text} if kind == "chat" else text,
                    finish_reason(seq) if event.finished else None, extra,
                )  # fmt: skip
                if not unfinished:
                    chunk["usage"] = usage(seqs, request.n)
                yield sse(chunk)
            if request.stream_options and request.stream_options.include_usage:
                object_name = "chat.completion.chunk" if kind == "chat" else "text_completion"
                yield sse(
                    {"id": response_id, "object": object_name, "created": created, "model": request.model,
                     "choices": [], "usage": usage(seqs, request.n)}
                )  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:
            self.worker.cancel([seq for seq in seqs if seq.index in unfinished])

    def _full_response(self, kind, request, seqs, collected) -> dict:
        tokenizer, names = self.mixture.tokenizer, self.mixture.expert_names
        choices = []
        for i, seq in enumerate(seqs):
            text = seq.result(tokenizer, {}).text
            choice = {"index": i, "finish_reason": finish_reason(seq)}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = (seq.prompt + text) if request.echo else text
            events = collected[seq.index]
            choice["logprobs"] = token_logprobs(kind, events, tokenizer) if seq.options.logprobs is not None else None
            if request.return_routing:
                choice["routing"] = routing_trace(seq, tokenizer, names)
            choices.append(choice)
        return {
            "id": new_id("chatcmpl" if kind == "chat" else "cmpl"),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": now(),
            "model": request.model,
            "choices": choices,
            "usage": usage(seqs, request.n),
        }


# ---- response pieces ----


def finish_reason(seq: SequenceState) -> str:
    return "length" if seq.finish_reason == "length" else "stop"


def prompt_tokens(sequences: list[SequenceState], n: int = 1) -> int:
    """The tokens of every prompt; the n choices of one prompt (consecutive sequences) count it once, as OpenAI."""
    return sum(len(s.prompt_ids) for s in sequences[::n])


def usage(sequences: list[SequenceState], n: int = 1) -> dict:
    prompt = prompt_tokens(sequences, n)
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


def token_logprobs(kind: str, events: list[TokenEvent], tokenizer) -> dict:
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


def _chunk(kind, response_id, created, model, index, content, reason=None, extra=None) -> dict:
    if kind == "chat":
        choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": reason}
        object_name = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": content, "logprobs": None, "finish_reason": reason}
        object_name = "text_completion"
    choice.update(extra or {})
    return {"id": response_id, "object": object_name, "created": created, "model": model, "choices": [choice]}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


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
