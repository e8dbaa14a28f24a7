"""Token-level routed generation: the mixture model, its decoding loop, and what it returns.

Every k generated tokens the router re-embeds each sequence's text (prompt plus what it has generated)
and sets new per-sequence weights. Two decode modes:

- cached    : keep the KV cache; earlier positions keep the keys/values computed under earlier weights.
- recompute : after each re-route, re-run the whole sequence under the new weights (what the reference
              loop does); tokens between re-routes use the cache built by that re-run.

At k=1 `recompute` is the reference algorithm: every token is predicted by a full forward pass over the
whole text with the weights routed on that text.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramix.adapters import ExpertAdapter
from loramix.bundle import Bundle, check_same_base, resolve_bundle
from loramix.errors import LoramixError
from loramix.mixture import MixtureState, attach_experts
from loramix.models import base_model_signature, load_base_model
from loramix.router import CentroidRouter, Embedder, RoutePolicy, parse_route

DECODE_MODES = ("cached", "recompute")


@dataclass(frozen=True)
class GenerationOptions:
    every_k: int = 2
    route: str = "paper"
    decode: str = "cached"
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # token ids whose log-probability as the FIRST generated token is reported (e.g. option letters)
    first_token_candidates: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.every_k <= 0:
            raise LoramixError(f"--every-k must be a positive number of tokens, got {self.every_k}.")
        if self.decode not in DECODE_MODES:
            raise LoramixError(f"Unknown decode mode '{self.decode}'; choose one of {', '.join(DECODE_MODES)}.")
        if self.max_new_tokens <= 0:
            raise LoramixError(f"--max-new-tokens must be positive, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise LoramixError("--min-new-tokens must be between 0 and --max-new-tokens.")
        if self.temperature < 0:
            raise LoramixError("--temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise LoramixError("--top-p must be in (0, 1].")


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

    sequence: int  # index of the prompt in the call
    index: int  # position among that sequence's generated tokens
    token_id: int
    text: str  # the text this token adds (may be "" until a multi-byte character completes)
    weights: list[float]
    rerouted: bool
    finished: bool


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


@dataclass
class _Sequence:
    index: int
    prompt: str
    prompt_ids: list[int]
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    reroutes: list[int] = field(default_factory=list)
    frozen: int = 0
    reused: int = 0
    finish_reason: str | None = None
    first_token_logprobs: list[float] | None = None


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
        self.router = router
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
        return mixture

    @property
    def merge(self) -> str:
        return self.state.mode

    def set_merge(self, mode: str) -> None:
        self.state.set_mode(mode)

    # ---- public API ----

    def generate(
        self, prompts: str | Sequence[str], batch_size: int | None = None, progress: bool = False, **options
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns one result) or many (a list, run in batches of `batch_size`)."""
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        size = batch_size or len(prompt_list) or 1
        results: list[GenerationResult] = []
        batches = [prompt_list[i : i + size] for i in range(0, len(prompt_list), size)]
        for batch in _progress(batches, progress, "generating"):
            run = GenerationStream(self, batch, GenerationOptions(**options))
            for _ in run:
                pass
            results.extend(run.results())
        return results[0] if single else results

    def stream(self, prompts: str | Sequence[str], **options) -> GenerationStream:
        """Iterate over it for each token as it is produced (one batch for all prompts); then call .results()."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        return GenerationStream(self, prompt_list, GenerationOptions(**options))

    # ---- pieces used by the decoding loop ----

    def forward(self, input_ids, attention_mask, position_ids, cache):
        """Logits of the last position [batch, vocab], and the KV cache (a new one if `cache` is None)."""
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        # transformers 5 renamed past_key_values to cache; the cache object is updated in place.
        cache_argument = {self._cache_keyword: cache}
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **cache_argument,
            )
        logits = out.logits[:, -1, :].float()
        if logits.is_cuda:  # so the time of the forward pass is counted as such, not in whatever waits next
            torch.cuda.synchronize(logits.device)
        return logits, cache

    def set_weights(self, weights: torch.Tensor | None) -> None:
        self.state.set_weights(weights, self.dtype, self.device)


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
        options.validate()
        if not prompts:
            raise LoramixError("No prompts given.")
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise LoramixError(f"Prompt {i} is empty; give some text to continue.")
        self.mx = mixture
        self.options = options
        self.policy: RoutePolicy = parse_route(options.route, mixture.expert_names)
        if self.policy.needs_router and mixture.router is None:
            raise LoramixError(f"Route '{options.route}' needs the router, but this model was loaded without one.")
        tokenizer = mixture.tokenizer
        self.sequences = [
            _Sequence(i, p, tokenizer(p).input_ids, IncrementalDetokenizer(tokenizer)) for i, p in enumerate(prompts)
        ]
        limit = getattr(mixture.model.config, "max_position_embeddings", None)
        longest = max(len(s.prompt_ids) for s in self.sequences)
        if limit is not None and longest + options.max_new_tokens > limit:
            raise LoramixError(
                f"A prompt of {longest} tokens plus {options.max_new_tokens} new tokens exceeds the model's "
                f"{limit}-token context; shorten the prompt or lower --max-new-tokens."
            )
        self.timing = {"prefill": 0.0, "decode": 0.0, "routing": 0.0, "total": 0.0}
        self.generator = None
        if options.temperature > 0:
            self.generator = torch.Generator().manual_seed(options.seed if options.seed is not None else 0)
        self.n_experts = len(mixture.expert_names)
        self._started = False

    # ---- routing ----

    def _routing_text(self, seq: _Sequence) -> str:
        # The reference decodes the whole text (prompt + generated) at every routing step.
        return self.mx.tokenizer.decode(seq.prompt_ids + seq.token_ids, skip_special_tokens=True)

    def _route(self, rows: list[int]) -> torch.Tensor | None:
        """Weights [len(rows), n_experts] for the active sequences, or None when the experts are off."""
        policy = self.policy
        if policy.kind == "base":
            return None
        if policy.kind == "fixed":
            return torch.tensor([policy.fixed] * len(rows))
        start = time.perf_counter()
        outcome = self.mx.router.route(rows, lambda i: self._routing_text(self.sequences[i]))
        for i, reused, at_limit in zip(rows, outcome.reused, outcome.at_limit):
            self.sequences[i].reused += int(reused)
            self.sequences[i].frozen += int(at_limit)
        self.timing["routing"] += time.perf_counter() - start
        return policy.rule(outcome.similarities)

    def _reroutes_at(self, step: int) -> bool:
        """Whether the router runs before generated token `step` (fixed policies never run it)."""
        if not self.policy.needs_router:
            return False
        if step == 0:
            return True
        return self.policy.kind == "dynamic" and step % self.options.every_k == 0

    # ---- token selection ----

    def _select(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        if step < self.options.min_new_tokens and self.mx.eos_ids:
            logits[:, self.mx.eos_ids] = float("-inf")
        if self.options.temperature == 0:
            return logits.argmax(dim=-1)
        probs = (logits / self.options.temperature).softmax(dim=-1)
        if self.options.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.options.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _finish_reason(self, seq: _Sequence, token_id: int, piece: str) -> str | None:
        if token_id in self.mx.eos_ids:
            return "eos"
        if self.options.stop and piece:
            tail = seq.detokenizer.text[-(len(piece) + max(len(s) for s in self.options.stop)) :]
            if any(stop in tail for stop in self.options.stop):
                return "stop"
        if len(seq.token_ids) >= self.options.max_new_tokens:
            return "length"
        return None

    # ---- the loop ----

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:
            raise LoramixError("A generation stream can be iterated only once.")
        self._started = True
        return self._decode()

    def _decode(self) -> Iterator[TokenEvent]:
        mx, options = self.mx, self.options
        run_start = time.perf_counter()
        if mx.router is not None:
            mx.router.reset()
        rows = list(range(len(self.sequences)))
        width = max(len(s.prompt_ids) for s in self.sequences)
        # Left padding keeps every sequence's newest token in the last column.
        ids = torch.full((len(rows), width), mx.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, seq in enumerate(self.sequences):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        ids, mask = ids.to(mx.device), mask.to(mx.device)

        weights = self._route(rows)
        mx.set_weights(weights)
        start = time.perf_counter()
        logits, cache = mx.forward(ids, mask, left_padded_positions(mask), None)
        self.timing["prefill"] += time.perf_counter() - start
        if options.first_token_candidates:
            candidates = list(options.first_token_candidates)
            chosen = logits.log_softmax(dim=-1)[:, candidates].cpu()
            for row, seq in enumerate(self.sequences):
                seq.first_token_logprobs = chosen[row].tolist()

        for step in range(options.max_new_tokens):
            rerouted = self._reroutes_at(step)
            next_ids = self._select(logits, step).cpu()
            keep = []
            for row, seq_index in enumerate(rows):
                seq = self.sequences[seq_index]
                token_id = int(next_ids[row])
                row_weights = weights[row] if weights is not None else torch.zeros(self.n_experts)
                seq.token_ids.append(token_id)
                seq.weights.append(row_weights)
                if rerouted:
                    seq.reroutes.append(step)
                piece = seq.detokenizer.add(token_id)
                seq.finish_reason = self._finish_reason(seq, token_id, piece)
                if seq.finish_reason is None:
                    keep.append(row)
                yield TokenEvent(
                    seq_index, step, token_id, piece, row_weights.tolist(), rerouted, seq.finish_reason is not None
                )
            if not keep:
                break
            new_column = next_ids.to(mx.device).unsqueeze(1)
            ids = torch.cat([ids, new_column], dim=1)
            mask = torch.cat([mask, torch.ones_like(new_column)], dim=1)
            shrank = len(keep) < len(rows)
            if shrank:  # drop finished sequences from the batch, the cache and the weights
                index = torch.tensor(keep, device=mx.device)
                ids, mask = ids[index], mask[index]
                cache.batch_select_indices(index)
                weights = weights[keep] if weights is not None else None
                rows = [rows[r] for r in keep]

            reroute = self._reroutes_at(step + 1)
            if reroute:
                weights = self._route(rows)
            if reroute or shrank:
                mx.set_weights(weights)
            start = time.perf_counter()
            if options.decode == "recompute" and reroute:
                logits, cache = mx.forward(ids, mask, left_padded_positions(mask), None)
            else:
                positions = left_padded_positions(mask)[:, -1:]
                logits, cache = mx.forward(ids[:, -1:], mask, positions, cache)
            self.timing["decode"] += time.perf_counter() - start
        self.timing["total"] = time.perf_counter() - run_start

    def results(self) -> list[GenerationResult]:
        tokenizer = self.mx.tokenizer
        n_tokens = sum(len(s.token_ids) for s in self.sequences)
        timing = dict(self.timing)
        timing["tokens"] = float(n_tokens)
        timing["tokens_per_second"] = n_tokens / timing["total"] if timing["total"] > 0 else 0.0
        results = []
        for seq in self.sequences:
            text = tokenizer.decode(seq.token_ids, skip_special_tokens=True)
            if seq.finish_reason == "stop":
                text = _cut_at_stop(text, self.options.stop)
            results.append(
                GenerationResult(
                    prompt=seq.prompt,
                    prompt_token_ids=seq.prompt_ids,
                    text=text,
                    token_ids=seq.token_ids,
                    tokens=tokenizer.convert_ids_to_tokens(seq.token_ids),
                    weights=torch.stack(seq.weights) if seq.weights else torch.zeros(0, self.n_experts),
                    reroutes=seq.reroutes,
                    frozen_reroutes=seq.frozen,
                    reused_embeddings=seq.reused,
                    finish_reason=seq.finish_reason or "length",
                    timing=timing,
                    first_token_logprobs=seq.first_token_logprobs,
                )
            )
        return results


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string it contains."""
    found = [text.find(stop) for stop in stops if stop in text]
    return text[: min(found)] if found else text


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (each row counts from its first real token)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)
