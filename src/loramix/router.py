"""The gradient-free router: cosine similarity of the text so far to each task's centroid, turned into weights.

Centroids are the mean sentence embedding (all-MiniLM-L6-v2 by default) of each task's training texts.
The embedder truncates its input (256 word pieces for MiniLM); once a text is longer, new tokens no longer
change its embedding, so a routing step whose truncated input is unchanged reuses the last embedding.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from loramix.cpu_kernels import cpu_has_native_bf16
from loramix.errors import LoramixError, OptionError
from loramix.layer_router import LAYER_RULES
from loramix.models import DEFAULT_EMBEDDER, resolve_embedder

PAPER_TEMPERATURE = 4.0
SOFTMAX_TEMPERATURE = 0.1
EMBEDDER_DTYPES = ("auto", "fp32", "bf16")
RULE_TEMPERATURES = (1e-4, 1e4)  # similarities in [-1, 1] divided (or the top one multiplied) stay finite
# "boost" is the paper's rule (the largest similarity boosted by T, then softmax); "paper" is its first spelling,
# kept so every stored result keeps its name and key
RULE_ALIASES = {"boost": "paper"}


def canonical_route(spec: str) -> str:
    """A route spec with every rule alias in its first spelling (what results are named and keyed by)."""
    return re.sub(r"(^|[:/])boost(?=$|[:+])", r"\1paper", spec)


def bf16_routing_pays(device: str | torch.device) -> bool:
    """Whether routing embeddings get faster under bf16 autocast: on a CPU with AVX512-BF16 / AMX (~1.8x), not on
    a GPU, where the small embedder is bound by kernel launches (measured on an H200: bf16 routing 10.6 ms/token,
    fp32 5.5 ms/token; see BENCHMARKS.md)."""
    return torch.device(device).type == "cpu" and cpu_has_native_bf16()


class Embedder:
    """A sentence-transformers model used for routing: texts -> unit vectors.

    dtype "bf16" runs the routing-time embeddings under bf16 autocast: on a CPU with AVX512-BF16 it is ~1.8x
    faster, with cosine similarities within ~2e-5 of fp32 (measured on task prompts). "auto" picks bf16 where it
    pays (such CPUs), else fp32. Centroids are always built in fp32.
    """

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str | torch.device = "cpu", dtype: str = "auto"):
        from sentence_transformers import SentenceTransformer

        if dtype not in EMBEDDER_DTYPES:
            raise LoramixError(f"Unknown embedder dtype '{dtype}'; choose one of {', '.join(EMBEDDER_DTYPES)}.")
        self.name = name
        location = resolve_embedder(name)
        try:
            self.model = SentenceTransformer(location, device=str(device))
        except OSError as exc:
            raise LoramixError(f"Could not load embedder '{name}' ({location}): {exc}") from exc
        self.model.eval()
        self.max_length = self.model.max_seq_length
        self.bf16 = dtype == "bf16" or (dtype == "auto" and bf16_routing_pays(device))

    @property
    def dim(self) -> int:
        return self.model.get_embedding_dimension()

    def truncated_ids(self, texts: Sequence[str]) -> tuple[dict, list[tuple[int, ...]]]:
        """Tokenize as the embedder will see the texts (truncated); also return each text's kept ids."""
        features = self.model.preprocess(list(texts))
        ids = [tuple(row[mask.bool()].tolist()) for row, mask in zip(features["input_ids"], features["attention_mask"])]
        return features, ids

    @property
    def dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @torch.no_grad()
    def embed_features(self, features: dict) -> torch.Tensor:
        """Routing-time embeddings of already tokenized texts (bf16 autocast when enabled)."""
        features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            vectors = self.model(features)["sentence_embedding"].float()
        return torch.nn.functional.normalize(vectors, dim=-1).cpu()

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """fp32 embeddings of many texts (centroid building)."""
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_tensor=True,
            show_progress_bar=False,
            normalize_embeddings=True,
        )
        return vectors.float().cpu()


def build_centroids(
    embedder: Embedder, texts_by_expert: dict[str, Sequence[str]], batch_size: int = 64, progress: bool = False
) -> torch.Tensor:
    """[n_experts, dim]: the mean embedding of each expert's training texts, rows in dict order."""
    from rich.progress import Progress

    for name, texts in texts_by_expert.items():
        if not texts:
            raise LoramixError(f"Expert '{name}' has no training texts to build its centroid from.")
    rows = []
    # our own bar (transient, drawn only on a terminal): the embedder's tqdm bars would leak into piped output
    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("text centroids", total=sum(len(t) for t in texts_by_expert.values()))
        for texts in texts_by_expert.values():
            total = torch.zeros(embedder.dim)
            for start in range(0, len(texts), batch_size * 4):
                chunk = list(texts[start : start + batch_size * 4])
                total += embedder.embed(chunk, batch_size=batch_size).sum(dim=0)
                bar.advance(job, len(chunk))
            rows.append(total / len(texts))
    return torch.stack(rows)


# ---- routing rules: similarities [b, n] -> weights [b, n], rows summing to 1 ----


def paper_weights(similarities: torch.Tensor, temperature: float = PAPER_TEMPERATURE) -> torch.Tensor:
    """The paper's rule: multiply the largest similarity by T, leave the others, softmax."""
    boosted = similarities.clone()
    top = similarities.argmax(dim=-1, keepdim=True)
    boosted.scatter_(-1, top, similarities.gather(-1, top) * temperature)
    return boosted.softmax(dim=-1)


def softmax_weights(similarities: torch.Tensor, temperature: float = SOFTMAX_TEMPERATURE) -> torch.Tensor:
    return (similarities / temperature).softmax(dim=-1)


def peak_weights(similarities: torch.Tensor, temperature: float = SOFTMAX_TEMPERATURE) -> torch.Tensor:
    """softmax(similarities / T) divided by its largest value: the top expert at its trained scale (1), the others
    in proportion. Soft weights below 1 dilute a LoRA trained at unit scale; these do not dilute the top one."""
    weights = softmax_weights(similarities, temperature)
    return weights / weights.max(dim=-1, keepdim=True).values


def top1_weights(similarities: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(similarities.argmax(dim=-1), similarities.shape[-1]).float()


def gate_weights(similarities: torch.Tensor, margin: float) -> torch.Tensor:
    """The most similar expert alone where it leads the second by at least `margin`, else all alike: commit only
    when the text clearly resembles one expert's (as a prior for in-layer routing, `prompt:gate:G+spectr`, a flat
    prior leaves each layer to decide)."""
    top2 = similarities.topk(min(2, similarities.shape[-1]), dim=-1).values
    clear = (top2[..., :1] - top2[..., -1:]) >= margin if top2.shape[-1] > 1 else torch.ones_like(top2, dtype=bool)
    flat = torch.full_like(similarities, 1.0 / similarities.shape[-1])
    return torch.where(clear, top1_weights(similarities), flat)


def topk_weights(similarities: torch.Tensor, k: int, temperature: float = SOFTMAX_TEMPERATURE) -> torch.Tensor:
    """softmax(similarities / T) over the k most similar experts, 0 for the others."""
    k = min(k, similarities.shape[-1])
    top = similarities.topk(k, dim=-1)
    weights = torch.zeros_like(similarities)
    return weights.scatter(-1, top.indices, (top.values / temperature).softmax(dim=-1))


@dataclass(frozen=True)
class RoutePolicy:
    """How weights are chosen during generation.

    kind: "dynamic" (re-route from the text every k tokens), "prompt" (route once on the prompt),
    "fixed" (constant weights, no embedding at all), "layer" (each layer routes each token itself: Arrow, SpectR) or
    "base" (experts off). A "prompt" policy with a `layer_rule` is both: the prompt's weights are a prior that each
    layer's own evidence multiplies, token by token (`layer_router`).
    """

    spec: str
    kind: str
    rule: Callable[[torch.Tensor], torch.Tensor] | None = None
    fixed: tuple[float, ...] | None = None
    n_experts: int = 0
    window: int | None = None  # route on the last `window` tokens only (dynamic policies), not the whole text
    window_head: int = 0  # ... plus the prompt's first `window_head` tokens
    hidden_layer: int | None = None  # route on the base model's layer-L hidden states, not on embedded text
    layer_rule: str | None = None  # the rule each layer routes by (`layer_router.LAYER_RULES`): kind "layer", or a
    # "prompt" policy whose weights are the layers' prior

    def routing_ids(self, prompt_ids: list[int], generated: list[int]) -> list[int]:
        """The token ids whose text the router embeds at a routing step."""
        text = prompt_ids + generated
        if self.window is None or len(text) <= self.window_head + self.window:
            return text
        return prompt_ids[: self.window_head] + text[-self.window :]

    @property
    def needs_router(self) -> bool:
        """Whether routing runs during generation (on text, or on hidden states)."""
        return self.kind in ("dynamic", "prompt")

    @property
    def needs_text_router(self) -> bool:
        return self.needs_router and self.hidden_layer is None


# The default of generate, demo and serve: the base model's own second-to-last hidden states, a sharp softmax,
# re-routing every token. It beat the paper's rule on the test items at no extra cost (ROUTING.md); the paper's
# rule stays one flag away (--route paper), and `eval`'s tla:k=K configs keep meaning the paper's rule.
HIDDEN_POLICY = "hidden:-2/softmax:0.05"
DEFAULT_ROUTE = "hidden"
DEFAULT_EVERY_K = 1

ROUTE_HELP = (
    f"hidden (the default: {HIDDEN_POLICY}), hidden:L/RULE, boost[:T] (the paper's rule; also 'paper'), softmax[:T], "
    "peak[:T] (softmax scaled so the top expert is at 1), top1, topk:K[:T], gate:G (top1 when it leads by G, else "
    "uniform), "
    "window:W[+P]/RULE, prompt[:RULE], arrow or spectr (per layer, per token), prompt[:RULE]+arrow|spectr (the "
    "prompt's weights as each layer's prior), base, uniform, oracle:NAME, "
    "fixed:w1,w2,..."
)


def _parse_rule(spec: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    name, _, arg = spec.partition(":")
    name = RULE_ALIASES.get(name, name)
    if name == "top1" and not arg:
        return top1_weights
    if name == "topk":
        k_text, _, t_text = arg.partition(":")
        try:
            k, temperature = int(k_text), float(t_text) if t_text else SOFTMAX_TEMPERATURE
        except ValueError:
            raise LoramixError(f"Route rule '{spec}': write topk:K or topk:K:T (K whole, T a number).") from None
        if k < 1 or not RULE_TEMPERATURES[0] <= temperature <= RULE_TEMPERATURES[1]:
            raise LoramixError(
                f"Route rule '{spec}': K must be at least 1 and T between {RULE_TEMPERATURES[0]:g} and "
                f"{RULE_TEMPERATURES[1]:g}."
            )
        return lambda sims: topk_weights(sims, k, temperature)
    if name == "gate":
        try:
            margin = float(arg)
        except ValueError:
            raise LoramixError(
                f"Route rule '{spec}': write gate:G, G the lead in similarity (0-2) that commits."
            ) from None
        if not 0 <= margin <= 2:
            raise LoramixError(f"Route rule '{spec}': G is a difference of cosine similarities, between 0 and 2.")
        return lambda sims: gate_weights(sims, margin)
    if name in ("paper", "softmax", "peak"):
        default = PAPER_TEMPERATURE if name == "paper" else SOFTMAX_TEMPERATURE
        try:
            temperature = float(arg) if arg else default
        except ValueError:
            raise LoramixError(f"Route rule '{spec}': the temperature '{arg}' is not a number.") from None
        if not temperature > 0:
            raise LoramixError(f"Route rule '{spec}': the temperature must be positive.")
        if not RULE_TEMPERATURES[0] <= temperature <= RULE_TEMPERATURES[1]:
            raise LoramixError(
                f"Route rule '{spec}': the temperature must be between {RULE_TEMPERATURES[0]:g} and "
                f"{RULE_TEMPERATURES[1]:g} (beyond, the weights overflow float32)."
            )
        function = {"paper": paper_weights, "softmax": softmax_weights, "peak": peak_weights}[name]
        return lambda sims: function(sims, temperature)
    return None


def parse_route(spec: str, expert_names: Sequence[str]) -> RoutePolicy:
    """Parse a --route value against the bundle's expert names (see ROUTE_HELP)."""
    if not isinstance(spec, str):
        raise OptionError("route", sentence=f"A route is text such as 'hidden' or 'paper', got {spec!r}.")
    try:
        policy = _parse_policy(spec.strip(), expert_names)
    except OptionError:
        raise
    except LoramixError as exc:  # every message of the parsers names the route it is about
        raise OptionError("route", sentence=str(exc)) from None
    return replace(policy, n_experts=len(expert_names))


def _parse_hidden(spec: str) -> RoutePolicy:
    """hidden:L/RULE: re-route on the running mean of the base model's layer-L hidden states (`hidden_router`).
    L counts from the embeddings (1: the first layer's output) or, when negative, back from the last (-1)."""
    head, _, rule_spec = spec.partition("/")
    _, _, layer_text = head.partition(":")
    rule = _parse_rule(rule_spec)
    try:
        layer = int(layer_text)
    except ValueError:
        layer = 0
    if rule is None or layer == 0:
        raise LoramixError(
            f"Route '{spec}': write hidden:L/RULE (L >= 1 a layer of the base model, or -1 for the last, -2 the one "
            "before; RULE boost[:T], softmax[:T], peak[:T], top1 or topk:K[:T]), e.g. hidden:-2/softmax:0.05."
        )
    return RoutePolicy(spec, "dynamic", rule=rule, hidden_layer=layer)


def _parse_window(spec: str) -> RoutePolicy:
    """window:W[+P]/RULE: re-route on the last W tokens (and the prompt's first P), so routing follows the text
    and never freezes at the embedder's input limit."""
    head, _, rule_spec = spec.partition("/")
    name, _, size = head.partition(":")
    last, _, first = size.partition("+")
    rule = _parse_rule(rule_spec)
    try:
        window, window_head = int(last), int(first or 0)
    except ValueError:
        window = window_head = -1
    if name != "window" or rule is None or window < 1 or window_head < 0:
        raise LoramixError(
            f"Route '{spec}': write window:W/RULE or window:W+P/RULE (W >= 1 recent tokens, P >= 0 tokens of the "
            "prompt's start; RULE boost[:T], softmax[:T], peak[:T], top1 or topk:K[:T]), e.g. window:64/softmax:0.05."
        )
    return RoutePolicy(spec, "dynamic", rule=rule, window=window, window_head=window_head)


def _parse_prompt(spec: str) -> RoutePolicy:
    """prompt[:RULE] routes once on the prompt; prompt[:RULE]+arrow|spectr makes those weights the prior of each
    layer's own per-token rule."""
    head, plus, layer_rule = spec.partition("+")
    if plus and layer_rule not in LAYER_RULES:
        raise LoramixError(f"Route '{spec}': after '+' comes a rule of each layer, {' or '.join(LAYER_RULES)}.")
    _, _, arg = head.partition(":")
    rule = _parse_rule(arg or "boost")
    if rule is None:
        raise LoramixError(f"Route '{spec}': '{arg}' is not a routing rule (paper[:T], softmax[:T], top1, topk:K[:T]).")
    return RoutePolicy(spec, "prompt", rule=rule, layer_rule=layer_rule or None)


def _parse_policy(spec: str, expert_names: Sequence[str]) -> RoutePolicy:
    n = len(expert_names)
    if spec == "hidden":
        return replace(_parse_hidden(HIDDEN_POLICY), spec=spec)
    if spec.startswith("hidden:"):
        return _parse_hidden(spec)
    if "/" in spec:
        return _parse_window(spec)
    rule = _parse_rule(spec)
    if rule is not None:
        return RoutePolicy(spec, "dynamic", rule=rule)
    name, _, arg = spec.partition(":")
    if name == "prompt" or name.startswith("prompt+"):
        return _parse_prompt(spec)
    if spec == "base":
        return RoutePolicy(spec, "base")
    if spec in LAYER_RULES:  # routed inside each layer from its own input (`layer_router`)
        return RoutePolicy(spec, "layer", layer_rule=spec)
    if spec == "uniform":
        return RoutePolicy(spec, "fixed", fixed=tuple([1.0 / n] * n))
    if name == "oracle":
        if arg not in expert_names:
            raise LoramixError(f"Route '{spec}': no expert named '{arg}'; the experts are {', '.join(expert_names)}.")
        return RoutePolicy(spec, "fixed", fixed=tuple(1.0 if e == arg else 0.0 for e in expert_names))
    if name == "fixed":
        try:
            weights = tuple(float(w) for w in arg.split(","))
        except ValueError:
            raise LoramixError(f"Route '{spec}': fixed weights must be numbers, e.g. fixed:0.5,0.2,0.2,0.1.") from None
        if len(weights) != n:
            raise LoramixError(
                f"Route '{spec}' gives {len(weights)} weights but the bundle has {n} experts "
                f"({', '.join(expert_names)})."
            )
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise LoramixError(f"Route '{spec}': weights must be finite and not negative.")
        return RoutePolicy(spec, "fixed", fixed=weights)
    raise LoramixError(f"Unknown route rule '{spec}'; choose one of {ROUTE_HELP}.")


@dataclass
class RoutingStats:
    embedded: int = 0  # texts run through the embedder
    reused: int = 0  # routing steps whose truncated input was unchanged (embedding reused)
    at_limit: int = 0  # routing steps whose text filled the embedder's input limit (routing frozen)
    seconds: float = 0.0


@dataclass(frozen=True)
class RoutingOutcome:
    """Cosine similarities [n_texts, n_experts] and, per text, how its embedding came about."""

    similarities: torch.Tensor
    reused: list[bool]  # the embedder's truncated input was unchanged since this sequence's last step
    at_limit: list[bool]  # the text filled the embedder's input limit: later tokens cannot change it


@dataclass
class RouteMemory:
    """What the router remembers of one sequence between its routing steps; owned by that sequence."""

    ids: tuple[int, ...] | None = None  # the embedder's truncated input at the last step
    vector: torch.Tensor | None = None  # and its embedding
    frozen: torch.Tensor | None = None  # similarities fixed for good: the text is past the limit to stay
    sliding: bool = False  # the routed text is a window that moves: it never freezes for good


@dataclass
class CentroidRouter:
    """Embeds texts and compares them with the task centroids, reusing embeddings whose input is unchanged.

    The router itself holds no per-sequence state: each sequence brings its own RouteMemory, so sequences of
    different requests can be routed together, in any order, on one shared router.
    """

    embedder: Embedder
    centroids: torch.Tensor  # [n_experts, dim]
    stats: RoutingStats = field(default_factory=RoutingStats)

    def __post_init__(self):
        if self.centroids.shape[1] != self.embedder.dim:
            raise LoramixError(
                f"The router's centroids are {self.centroids.shape[1]}-dimensional but embedder "
                f"'{self.embedder.name}' gives {self.embedder.dim}; rebuild the router with this embedder."
            )
        self._unit_centroids = torch.nn.functional.normalize(self.centroids.float(), dim=-1)

    def route(self, memories: Sequence[RouteMemory], text_for: Callable[[int], str]) -> RoutingOutcome:
        """Similarities for several sequences; `text_for(i)` gives the current text of the i-th.

        A sequence whose text is past the embedder's input limit for good (the part before its last white space
        already fills the input, so nothing appended can change what the embedder sees) is neither decoded,
        tokenized nor embedded again: its last embedding is reused.
        """
        start = time.perf_counter()
        live = [i for i, memory in enumerate(memories) if memory.frozen is None]
        outcome = self.similarities([text_for(i) for i in live], [memories[i] for i in live]) if live else None
        rows, reused, at_limit = [], [], []
        position = {i: j for j, i in enumerate(live)}
        for i, memory in enumerate(memories):
            if i in position:
                j = position[i]
                rows.append(outcome.similarities[j])
                reused.append(outcome.reused[j])
                at_limit.append(outcome.at_limit[j])
            else:
                rows.append(memory.frozen)
                reused.append(True)
                at_limit.append(True)
        if len(live) < len(memories):
            self.stats.reused += len(memories) - len(live)
            self.stats.at_limit += len(memories) - len(live)
            self.stats.seconds += time.perf_counter() - start
        return RoutingOutcome(torch.stack(rows), reused, at_limit)

    def _frozen_for_good(self, text: str) -> bool:
        """Whether the text before its last white space alone fills the embedder's input."""
        cut = max(text.rfind(c) for c in " \n\t\r")
        if cut <= 0:
            return False
        tokenizer = self.embedder.model.tokenizer
        room = self.embedder.max_length - tokenizer.num_special_tokens_to_add()
        return len(tokenizer(text[:cut], add_special_tokens=False).input_ids) >= room

    def similarities(self, texts: Sequence[str], memories: Sequence[RouteMemory] | None = None) -> RoutingOutcome:
        """Cosine similarities to the centroids; each text's memory (if given) lets its embedding be reused."""
        start = time.perf_counter()
        features, ids = self.embedder.truncated_ids(texts)
        memories = list(memories) if memories is not None else [None] * len(texts)
        vectors: list[torch.Tensor | None] = [None] * len(texts)
        reused = [False] * len(texts)
        for i, memory in enumerate(memories):
            if memory is not None and memory.ids == ids[i]:
                vectors[i], reused[i] = memory.vector, True
        todo = [i for i, v in enumerate(vectors) if v is None]
        if todo:
            width = max(len(ids[i]) for i in todo)
            subset = {
                k: v[todo][:, :width] for k, v in features.items() if isinstance(v, torch.Tensor) and v.dim() == 2
            }
            for i, vector in zip(todo, self.embedder.embed_features(subset)):
                vectors[i] = vector
                if memories[i] is not None:
                    memories[i].ids, memories[i].vector = ids[i], vector
        at_limit = [len(kept) >= self.embedder.max_length for kept in ids]
        self.stats.embedded += len(todo)
        self.stats.reused += len(texts) - len(todo)
        self.stats.at_limit += sum(at_limit)
        sims = torch.stack(vectors) @ self._unit_centroids.T
        for i, (memory, text, limited) in enumerate(zip(memories, texts, at_limit)):
            if (
                limited
                and memory is not None
                and not memory.sliding
                and memory.frozen is None
                and self._frozen_for_good(text)
            ):
                memory.frozen = sims[i]
        self.stats.seconds += time.perf_counter() - start
        return RoutingOutcome(sims, reused, at_limit)
