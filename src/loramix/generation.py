"""Token-level routed generation: `MixtureModel` (the model under routing, with generate and stream), and
generation over it as a stream of tokens.

Every k generated tokens the router re-embeds each sequence's text (prompt plus what it has generated)
and sets new per-sequence weights. Two decode modes:

- cached    : keep the KV cache; earlier positions keep the keys/values computed under earlier weights.
- recompute : after each re-route, re-run the whole sequence under the new weights (what the reference
              loop does); tokens between re-routes use the cache built by that re-run.

At k=1 `recompute` is the reference algorithm: every token is predicted by a full forward pass over the
whole text with the weights routed on that text. The decoding loop itself is `loramix.engine`; the state of
each sequence is `loramix.sequences`; the model's forward passes are `loramix.mixture_model`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace

from loramix.engine import Engine, left_padded_positions
from loramix.errors import LoramixError
from loramix.mixture_model import RoutedModel
from loramix.sequences import (
    DECODE_MODES,
    GenerationOptions,
    GenerationResult,
    SequenceState,
    TokenEvent,
    cut_at_stop,
    new_sequence,
)

__all__ = [
    "DECODE_MODES", "GenerationOptions", "GenerationResult", "GenerationStream", "MixtureModel", "TokenEvent",
    "cut_at_stop", "left_padded_positions",
]  # fmt: skip


def _options(options: GenerationOptions | None, changes: dict) -> GenerationOptions:
    """The options of one call: the given object (or the defaults) with any fields changed by keyword."""
    unknown = set(changes) - {f.name for f in fields(GenerationOptions)}
    if unknown:
        raise LoramixError(f"Unknown generation option(s): {', '.join(sorted(unknown))}.")
    if options is not None and not isinstance(options, GenerationOptions):
        raise LoramixError(f"options must be a GenerationOptions, got {type(options).__name__}.")
    return replace(options or GenerationOptions(), **changes)


class MixtureModel(RoutedModel):
    """A base causal LM with LoRA experts mixed per token by a gradient-free router: the model under routing
    (`loramix.mixture_model`), plus generation over it."""

    def generate(
        self, prompts: str | Sequence[str], options: GenerationOptions | None = None, batch_size: int | None = None,
        progress: bool = False, **changes,
    ) -> GenerationResult | list[GenerationResult]:  # fmt: skip
        """Generate for one prompt (returns one result) or many (a list, run in batches of `batch_size`).

        `options` (default GenerationOptions()) with any field changed by keyword: generate(p, max_new_tokens=8)."""
        options = _options(options, changes)
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        size = batch_size or len(prompt_list) or 1
        results: list[GenerationResult] = []
        batches = [prompt_list[i : i + size] for i in range(0, len(prompt_list), size)]
        for batch in _progress(batches, progress, "generating"):
            run = GenerationStream(self, batch, options)
            for _ in run:
                pass
            results.extend(run.results())
        return results[0] if single else results

    def stream(
        self, prompts: str | Sequence[str], options: GenerationOptions | None = None, **changes
    ) -> GenerationStream:
        """Iterate over it for each token as it is produced (one batch for all prompts); then call .results()."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        return GenerationStream(self, prompt_list, _options(options, changes))

    def new_sequence(self, prompt: str | list[int], options: GenerationOptions, index: int = 0) -> SequenceState:
        """One sequence to generate, checked before any work (see `loramix.sequences.new_sequence`)."""
        return new_sequence(self, prompt, options, index)


def _progress(items: list, enabled: bool, label: str):
    if not enabled or len(items) <= 1:
        return items
    from rich.progress import track

    return track(items, description=label)


class GenerationStream:
    """One batch of prompts decoded together; each sequence is routed on its own text.

    Iterating yields a TokenEvent per generated token; `results()` gives the finished sequences.
    """

    def __init__(
        self, mixture: MixtureModel, prompts: list[str], options: GenerationOptions,
        per_prompt: list[GenerationOptions] | None = None,
    ):  # fmt: skip
        """`per_prompt`: each prompt's own options instead of `options` (e.g. its gold answer to force)."""
        if not prompts:
            raise LoramixError("No prompts given.")
        self.mx = mixture
        self.options = options
        chosen = per_prompt or [options] * len(prompts)
        self.sequences = [mixture.new_sequence(p, o, i) for i, (p, o) in enumerate(zip(prompts, chosen))]
        self.engine = Engine(mixture)
        self.timing = {"prefill": 0.0, "decode": 0.0, "routing": 0.0, "total": 0.0}
        self._started = False

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:
            raise LoramixError("A generation stream can be iterated only once.")
        self._started = True
        return self._decode()

    def _decode(self) -> Iterator[TokenEvent]:
        start = time.perf_counter()
        for seq in self.sequences:
            self.engine.add(seq)
        while self.engine.busy:
            for event in self.engine.step():
                if event.finish_reason == "error":
                    raise LoramixError(f"Generation failed on prompt {event.sequence}: {event.error}")
                yield event
        self.timing.update(self.engine.timing)
        self.timing["total"] = time.perf_counter() - start

    def results(self) -> list[GenerationResult]:
        n_tokens = sum(len(s.token_ids) for s in self.sequences)
        timing = dict(self.timing)
        timing["tokens"] = float(n_tokens)
        timing["tokens_per_second"] = n_tokens / timing["total"] if timing["total"] > 0 else 0.0
        return [seq.result(self.mx.tokenizer, timing) for seq in self.sequences]
