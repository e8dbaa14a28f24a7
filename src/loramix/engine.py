"""Continuous batching: sequences join and leave one running decode batch between steps.

A lane is one running batch: its sequences, their left-padded attention mask [b, L] and one KV cache whose
rows are theirs. The merge mode decides the maths of every mixture layer, so each merge mode has a lane of its
own; everything else (routing rule, k, decode mode, sampling, stop strings) belongs to each sequence.

One `step()`:
1. admit waiting sequences (while fewer than `max_batch` run): route them on their prompts, prefill them
   together and join their cache rows to their lane, left-padding whichever side is shorter;
2. every running sequence picks its next token from its last logits; finished and cancelled ones leave;
3. the sequences whose re-route is due get new weights (one embedder call for all of them); under
   decode=recompute they are prefilled again on their whole text under the new weights and re-join, the
   others advance one token, in one forward pass per lane.

`GenerationStream` is this loop with every sequence admitted at once; the server feeds it as requests come.
A sequence's tokens do not depend on what else is in the batch (left padding is masked out).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from loramix.errors import LoramixError
from loramix.sequences import SequenceState, TokenEvent


@dataclass
class Lane:
    """The running batch of one merge mode."""

    merge: str
    rows: list[SequenceState] = field(default_factory=list)
    mask: torch.Tensor | None = None  # [b, L]: 1 for real tokens, 0 for left padding
    cache: object = None  # the model's KV cache, row i belongs to rows[i]
    logits: torch.Tensor | None = None  # [b, vocab]: each row's logits for its next token
    _weights: torch.Tensor | None = None  # [b, n_experts], rebuilt only when a row's weights change

    def weights_changed(self) -> None:
        self._weights = None

    def weights(self) -> torch.Tensor | None:
        """[b, n_experts] of the rows' weights now in force (zeros for a row with the experts off)."""
        if self._weights is None and any(seq.weights is not None for seq in self.rows):
            n = self.rows[0].policy.n_experts
            self._weights = torch.stack([s.weights if s.weights is not None else torch.zeros(n) for s in self.rows])
        return self._weights

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order), and drop left-padding columns no row needs any more."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        self._weights = None
        if not self.rows:
            self.mask = self.cache = self.logits = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.mask, self.logits = self.mask[index], self.logits[index]
        self.cache.batch_select_indices(index)
        unused = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
        if unused and _plain_layers(self.cache):
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]

    def join(self, rows: list[SequenceState], mask: torch.Tensor, cache, logits: torch.Tensor) -> None:
        """Add prefilled rows; the shorter side is left-padded (masked out) to the longer one's length."""
        self._weights = None
        if not self.rows:
            self.rows, self.mask, self.cache, self.logits = list(rows), mask, cache, logits
            return
        if not (_plain_layers(self.cache) and _plain_layers(cache)):
            raise LoramixError(
                "This model's KV cache is not a plain per-token cache (e.g. a sliding window), so sequences "
                "cannot join a running batch; run requests one batch at a time (--max-batch 1)."
            )
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.rows += rows
        self.logits = torch.cat([self.logits, logits])


def _plain_layers(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        not getattr(layer, "is_sliding", False) and getattr(layer, "keys", None) is not None for layer in layers
    )


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Engine:
    """Steps any number of sequences on one MixtureModel; sequences may be added and cancelled between steps."""

    def __init__(self, mixture, max_batch: int | None = None):
        self.mx = mixture
        self.max_batch = max_batch
        self.lanes: dict[str, Lane] = {}
        self.waiting: deque[SequenceState] = deque()
        self._lock = threading.Lock()  # add/cancel may come from other threads than the one stepping
        self.timing = {"prefill": 0.0, "decode": 0.0, "routing": 0.0}
        self.reroutes = 0
        self.steps = 0

    # ---- what callers use ----

    def add(self, seq: SequenceState) -> None:
        with self._lock:
            self.waiting.append(seq)

    def cancel(self, seq: SequenceState) -> None:
        """The sequence leaves the batch at the next step (its KV cache rows are freed then)."""
        seq.cancelled = True

    @property
    def running(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values())

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def step(self) -> list[TokenEvent]:
        """Admit who waits, give every running sequence one token, and run the forward pass for the next."""
        self._admit()
        events: list[TokenEvent] = []
        for lane in self.lanes.values():
            events += self._pick_tokens(lane)
        self._advance()
        self.steps += 1
        return events

    # ---- the three parts of a step ----

    def _admit(self) -> None:
        with self._lock:
            room = len(self.waiting) if self.max_batch is None else max(0, self.max_batch - self.running)
            admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        admitted = [seq for seq in admitted if not seq.cancelled]
        if not admitted:
            return
        self._sum_prompt_hidden_states([seq for seq in admitted if seq.policy.hidden_layer is not None])
        self._route([seq for seq in admitted if seq.reroutes_at(0)])
        for seq in admitted:
            if seq.policy.kind == "fixed":
                seq.weights = torch.tensor(seq.policy.fixed, dtype=torch.float32)
        for merge, group in self._by_lane(admitted).items():
            self._prefill(self.lanes.setdefault(merge, Lane(merge)), group)

    def _pick_tokens(self, lane: Lane) -> list[TokenEvent]:
        events, keep = [], []
        for row, seq in enumerate(lane.rows):
            if seq.cancelled:
                continue
            logits = lane.logits[row]
            token_id = seq.select(logits, self.mx.eos_ids)
            if seq.options.logprobs is not None:
                logprobs = logits.log_softmax(dim=-1)
                seq.token_logprobs.append(float(logprobs[token_id]))
            event = seq.append(token_id, self.mx.eos_ids, rerouted=seq.reroutes_at(seq.step))
            if seq.options.logprobs is not None:
                event.logprob = seq.token_logprobs[-1]
                if seq.options.logprobs:
                    top = logprobs.topk(seq.options.logprobs)
                    event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            events.append(event)
            if not seq.finished:
                keep.append(row)
        lane.keep(keep)
        return events

    def _advance(self) -> None:
        due = [seq for lane in self.lanes.values() for seq in lane.rows if seq.reroutes_at(seq.step)]
        self._route(due)
        due = set(due)  # sequences compare by identity
        for lane in self.lanes.values():
            if not lane.rows:
                continue
            if any(seq in due for seq in lane.rows):
                lane.weights_changed()
            again = [i for i, seq in enumerate(lane.rows) if seq.options.decode == "recompute" and seq in due]
            if again:  # re-run their whole text under the new weights, then re-join
                redo = [lane.rows[i] for i in again]
                lane.keep([i for i in range(len(lane.rows)) if i not in again])
            if lane.rows:
                self._decode(lane)
            if again:
                self._prefill(lane, redo)

    # ---- model calls ----

    def _route(self, seqs: list[SequenceState]) -> None:
        """New weights for these sequences, each by its own policy: on its hidden states or on its text."""
        start = time.perf_counter()
        self._route_on_hidden_states([seq for seq in seqs if seq.policy.hidden_layer is not None])
        self._route_on_text([seq for seq in seqs if seq.policy.needs_text_router])
        self.reroutes += sum(seq.policy.needs_router for seq in seqs)
        self.timing["routing"] += time.perf_counter() - start

    def _route_on_hidden_states(self, seqs: list[SequenceState]) -> None:
        """The running mean of each sequence's own layer-L states against the hidden centroids: no embedder."""
        by_policy: dict[str, list[SequenceState]] = {}
        for seq in seqs:
            by_policy.setdefault(seq.policy.spec, []).append(seq)
        for group in by_policy.values():
            pooled = torch.stack([seq.hidden_sum / max(seq.hidden_count, 1) for seq in group])
            policy = group[0].policy
            weights = policy.rule(self.mx.hidden_router.similarities(policy.hidden_layer, pooled))
            for seq, row in zip(group, weights):
                seq.weights = row

    def _route_on_text(self, seqs: list[SequenceState]) -> None:
        """The embedder on each sequence's routing text, in one call for all of them."""
        if not seqs:
            return
        decode = self.mx.tokenizer.decode
        outcome = self.mx.router.route(
            [seq.memory for seq in seqs],
            lambda i: decode(seqs[i].policy.routing_ids(seqs[i].prompt_ids, seqs[i].token_ids),
                             skip_special_tokens=True),
        )  # fmt: skip
        for i, seq in enumerate(seqs):
            seq.weights = seq.policy.rule(outcome.similarities[i : i + 1])[0]
            seq.reused += int(outcome.reused[i])
            seq.frozen += int(outcome.at_limit[i])

    def _sum_prompt_hidden_states(self, seqs: list[SequenceState]) -> None:
        """Hidden routing starts from the prompt's own states: one experts-off pass over the prompts."""
        if not seqs:
            return
        ids, mask = self._left_padded([seq.prompt_ids for seq in seqs])
        layers = tuple(sorted({seq.policy.hidden_layer for seq in seqs}))
        start = time.perf_counter()
        sums = self.mx.prompt_hidden_sums(ids, mask, left_padded_positions(mask), layers)
        self.timing["routing"] += time.perf_counter() - start
        for row, seq in enumerate(seqs):
            seq.hidden_sum, seq.hidden_count = sums[seq.policy.hidden_layer][row], len(seq.prompt_ids)

    def _left_padded(self, texts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad(texts, self.mx.pad_id)
        return ids.to(self.mx.device), mask.to(self.mx.device)

    def _prefill(self, lane: Lane, seqs: list[SequenceState]) -> None:
        """Run these sequences' whole texts (left-padded together) and join them to the lane."""
        mx = self.mx
        ids, mask = self._left_padded([seq.prompt_ids + seq.token_ids for seq in seqs])
        weights = Lane(lane.merge, rows=seqs).weights()
        # a re-run (decode=recompute) processes one token no pass has yet: hidden routing counts it
        again = [s for s in seqs if s.step > 0 and s.policy.hidden_layer is not None]
        layers = tuple(sorted({s.policy.hidden_layer for s in again}))
        start = time.perf_counter()
        logits, cache, hidden = mx.forward(
            ids, mask, left_padded_positions(mask), None, weights, lane.merge, capture=layers
        )
        self.timing["prefill"] += time.perf_counter() - start
        for row, seq in enumerate(seqs):
            if seq in again:
                seq.hidden_sum = seq.hidden_sum + hidden[seq.policy.hidden_layer][row, -1].float().cpu()
                seq.hidden_count += 1
        for row, seq in enumerate(seqs):
            if seq.options.first_token_candidates and seq.step == 0:
                candidates = list(seq.options.first_token_candidates)
                seq.first_token_logprobs = logits[row].log_softmax(dim=-1)[candidates].cpu().tolist()
        lane.join(seqs, mask, cache, logits)

    def _decode(self, lane: Lane) -> None:
        mx = self.mx
        last = torch.tensor([[seq.token_ids[-1]] for seq in lane.rows], device=mx.device)
        lane.mask = torch.cat([lane.mask, torch.ones_like(last)], dim=1)
        positions = lane.mask.sum(dim=1, keepdim=True) - 1
        layers = tuple(sorted({s.policy.hidden_layer for s in lane.rows if s.policy.hidden_layer is not None}))
        start = time.perf_counter()
        lane.logits, lane.cache, hidden = mx.forward(
            last, lane.mask, positions, lane.cache, lane.weights(), lane.merge, capture=layers
        )
        self.timing["decode"] += time.perf_counter() - start
        latest = {layer: state[:, -1].float().cpu() for layer, state in hidden.items()}  # one copy per layer
        for row, seq in enumerate(lane.rows):  # hidden routing: the token just processed joins the running mean
            if seq.policy.hidden_layer is not None:
                seq.hidden_sum = seq.hidden_sum + latest[seq.policy.hidden_layer][row]
                seq.hidden_count += 1

    def _by_lane(self, seqs: list[SequenceState]) -> dict[str, list[SequenceState]]:
        groups: dict[str, list[SequenceState]] = {}
        for seq in seqs:
            groups.setdefault(seq.options.merge or self.mx.merge, []).append(seq)
        return groups


def left_pad(texts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, width] and attention mask, left-padded so every row's newest token is in the last column."""
    width = max(len(t) for t in texts)
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, width - len(text) :] = torch.tensor(text)
        mask[row, width - len(text) :] = 1
    return ids, mask


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (each row counts from its first real token)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)
