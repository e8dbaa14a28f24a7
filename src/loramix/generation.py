"""Token-level routed generation: the mixture model, and generation over it as a stream of tokens.

Every k generated tokens the router re-embeds each sequence's text (prompt plus what it has generated)
and sets new per-sequence weights. Two decode modes:

- cached    : keep the KV cache; earlier positions keep the keys/values computed under earlier weights.
- recompute : after each re-route, re-run the whole sequence under the new weights (what the reference
              loop does); tokens between re-routes use the cache built by that re-run.

At k=1 `recompute` is the reference algorithm: every token is predicted by a full forward pass over the
whole text with the weights routed on that text. The decoding loop itself is `loramix.engine`; the state of
each sequence is `loramix.sequences`.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch

from loramix.adapters import ExpertAdapter, check_same_base
from loramix.bundle import Bundle, resolve_bundle
from loramix.engine import Engine, left_padded_positions
from loramix.errors import LoramixError
from loramix.hidden_router import HIDDEN_ROUTER_FILE, HiddenRouter, load_hidden_centroids
from loramix.mixture import MixtureState, attach_experts
from loramix.models import base_model_signature, load_base_model
from loramix.router import CentroidRouter, Embedder, parse_route
from loramix.sequences import (
    DECODE_MODES,
    GenerationOptions,
    GenerationResult,
    IncrementalDetokenizer,
    SequenceState,
    TokenEvent,
    cut_at_stop,
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


class MixtureModel:
    """A base causal LM with LoRA experts mixed per token by a gradient-free router."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        experts: list[ExpertAdapter],
        router: CentroidRouter | None,
        merge: str = "exact",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.expert_names = [e.name for e in experts]
        self.state: MixtureState = attach_experts(model, experts, merge)
        self._merge = merge
        self.router = router
        self.hidden_router: HiddenRouter | None = None  # set by from_bundle when the bundle has one
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        parameters = inspect.signature(model.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self.context_limit: int | None = getattr(model.config, "max_position_embeddings", None)
        # One forward pass at a time: the weights and merge mode are set on the shared layers just before it.
        self._forward_lock = threading.Lock()
        self._loaded_weights: torch.Tensor | None = None

    @classmethod
    def from_bundle(
        cls,
        path: str | Path | None = None,
        merge: str = "exact",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        with_router: bool = True,
        embedder_dtype: str = "auto",
    ) -> MixtureModel:
        """Load a bundle (the default one if `path` is None): base model, experts, router.

        embedder_dtype: "fp32" reproduces the reference's routing exactly; "bf16" is ~1.8x cheaper routing on
        CPUs with native bf16 (similarities within ~2e-5); "auto" picks bf16 there and fp32 elsewhere (GPUs included).
        """
        bundle = Bundle.load(resolve_bundle(path))
        model, tokenizer = load_base_model(bundle.base_model, dtype=dtype, device=device)
        experts = bundle.load_experts(dtype)
        check_same_base(experts, base_model_signature(model), bundle.base_model)
        router = None
        if with_router:
            router = CentroidRouter(Embedder(bundle.embedder, device, embedder_dtype), bundle.load_centroids())
        mixture = cls(model, tokenizer, experts, router, merge)
        mixture.bundle = bundle
        hidden = bundle.root / HIDDEN_ROUTER_FILE
        if hidden.is_file():
            mixture.hidden_router = HiddenRouter(load_hidden_centroids(hidden, bundle.expert_names))
        return mixture

    @property
    def merge(self) -> str:
        """The merge mode of sequences that do not choose one."""
        return self._merge

    def set_merge(self, mode: str) -> None:
        self.state.check_mode(mode)
        self._merge = mode

    # ---- public API ----

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
        """One sequence to generate, checked before any work: options, route, merge mode, prompt, context.

        `prompt` is text, or token ids (their text is decoded for routing and results)."""
        options.validate()
        policy = parse_route(options.route, self.expert_names)
        if policy.needs_text_router and self.router is None:
            raise LoramixError(f"Route '{options.route}' needs the router, but this model was loaded without one.")
        if policy.hidden_layer is not None:
            if self.hidden_router is None:
                raise LoramixError(
                    f"Route '{options.route}' needs the bundle's hidden-state centroids ({HIDDEN_ROUTER_FILE}); "
                    "build them with `loramix router hidden BUNDLE`, or choose a text route such as --route paper."
                )
            layers = self.hidden_router.n_layers
            if not -layers <= policy.hidden_layer <= layers:
                raise LoramixError(f"Route '{options.route}': this base model has {layers} layers.")
            if policy.hidden_layer < 0:  # counted back from the last layer
                policy = replace(policy, hidden_layer=layers + 1 + policy.hidden_layer)
        if options.merge is not None:
            self.state.check_mode(options.merge)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise LoramixError(f"Prompt {index} is empty; give some text to continue.")
            prompt_ids = self.tokenizer(prompt).input_ids
        else:
            prompt_ids = list(prompt)
            if not prompt_ids:
                raise LoramixError(f"Prompt {index} has no tokens; give some text to continue.")
            vocabulary = len(self.tokenizer)
            if any(not 0 <= t < vocabulary for t in prompt_ids):
                raise LoramixError(f"Prompt {index} has token ids outside the vocabulary (0..{vocabulary - 1}).")
            prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        limit = self.context_limit
        if limit is not None and len(prompt_ids) + options.max_new_tokens > limit:
            raise LoramixError(
                f"A prompt of {len(prompt_ids)} tokens plus {options.max_new_tokens} new tokens exceeds the model's "
                f"{limit}-token context; shorten the prompt or lower --max-new-tokens."
            )
        return SequenceState(index, prompt, prompt_ids, options, policy, IncrementalDetokenizer(self.tokenizer))

    # ---- pieces used by the decoding loop ----

    def forward(
        self, input_ids, attention_mask, position_ids, cache, weights=None, merge: str | None = None,
        capture: tuple[int, ...] = (),
    ):  # fmt: skip
        """Logits of the last position [batch, vocab], the KV cache (a new one if `cache` is None), and the hidden
        states after each layer in `capture` ({layer: [batch, seq, hidden]}, for hidden-state routing).

        weights: [batch, n_experts] routing weights for this pass (None: experts off); merge: the merge mode
        (None: the model's). Both are set on the shared mixture layers inside the same lock as the pass.
        """
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        # transformers 5 renamed past_key_values to cache; the cache object is updated in place.
        cache_argument = {self._cache_keyword: cache}
        with self._forward_lock, torch.no_grad():
            if merge is not None and merge != self.state.mode:
                self.state.set_mode(merge)
                self._loaded_weights = None
            if weights is not self._loaded_weights or weights is None:
                self.set_weights(weights)
                self._loaded_weights = weights
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=bool(capture),
                **cache_argument,
            )
        hidden = {layer: out.hidden_states[layer] for layer in capture}
        logits = out.logits[:, -1, :].float()
        if logits.is_cuda:  # so the time of the forward pass is counted as such, not in whatever waits next
            torch.cuda.synchronize(logits.device)
        return logits, cache, hidden

    def prompt_hidden_sums(self, input_ids, attention_mask, position_ids, layers: tuple[int, ...]) -> dict:
        """{layer: [batch, hidden]}: the sum over each row's real tokens of the base model's layer-L states
        (experts off: what the centroids were built from)."""
        with self._forward_lock, torch.no_grad():
            self.set_weights(None)
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=1, output_hidden_states=True,
            )  # fmt: skip
        weights = attention_mask.to(torch.float32).unsqueeze(-1)
        return {layer: (out.hidden_states[layer].float() * weights).sum(dim=1).cpu() for layer in layers}

    def set_weights(self, weights: torch.Tensor | None) -> None:
        self.state.set_weights(weights, self.dtype, self.device)
        self._loaded_weights = None


def _progress(items: list, enabled: bool, label: str):
    if not enabled or len(items) <= 1:
        return items
    from rich.progress import track

    return track(items, description=label)


class GenerationStream:
    """One batch of prompts decoded together; each sequence is routed on its own text.

    Iterating yields a TokenEvent per generated token; `results()` gives the finished sequences.
    """

    def __init__(self, mixture: MixtureModel, prompts: list[str], options: GenerationOptions):
        if not prompts:
            raise LoramixError("No prompts given.")
        self.mx = mixture
        self.options = options
        self.sequences = [mixture.new_sequence(prompt, options, i) for i, prompt in enumerate(prompts)]
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
            yield from self.engine.step()
        self.timing.update(self.engine.timing)
        self.timing["total"] = time.perf_counter() - start

    def results(self) -> list[GenerationResult]:
        n_tokens = sum(len(s.token_ids) for s in self.sequences)
        timing = dict(self.timing)
        timing["tokens"] = float(n_tokens)
        timing["tokens_per_second"] = n_tokens / timing["total"] if timing["total"] > 0 else 0.0
        return [seq.result(self.mx.tokenizer, timing) for seq in self.sequences]
