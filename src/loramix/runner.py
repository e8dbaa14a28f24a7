"""The model runner: the forward passes of a step, and the running batches' KV caches.

A lane is one running batch: its sequences, their left-padded attention mask [b, L] and one KV cache whose rows
are theirs. The merge mode decides the maths of every mixture layer, so each merge mode has a lane of its own.
Prefill passes take whole prompts of several sequences (left-padded together) or one chunk of one long prompt
(its own cache, continued chunk by chunk); a finished prefill joins its lane, left-padding whichever side is
shorter. A sequence's tokens do not depend on what else is in the batch: padding is masked out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loramix.errors import LoramixError
from loramix.hidden_router import masked_sum
from loramix.layer_router import LAYER_RULES
from loramix.packing import pack, segment_sums, unpack_cache, worth_packing
from loramix.scheduler import ROUTING, PrefillJob, Work
from loramix.sequences import SequenceState


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
        if self._weights is None:
            self._weights = stacked_weights(self.rows)
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


def stacked_weights(seqs: list[SequenceState]) -> torch.Tensor | None:
    """[b, n_experts] of these sequences' weights (zeros for experts off; in-layer routing: its prior), or None when
    every one has them off."""
    rows = [seq.prior if seq.prior is not None else seq.weights for seq in seqs]
    if all(row is None for row in rows):
        return None
    n = seqs[0].policy.n_experts
    return torch.stack([row if row is not None else torch.zeros(n) for row in rows])


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


def _layer_rows(seqs: list[SequenceState]) -> torch.Tensor | None:
    """[b]: each row's in-layer routing rule (1 + its index in LAYER_RULES; 0 for the others), None when none is."""
    rows = [LAYER_RULES.index(seq.policy.layer_rule) + 1 if seq.policy.layer_rule else 0 for seq in seqs]
    return torch.tensor(rows) if any(rows) else None


def _take_layer_weights(mixture, seqs: list[SequenceState]) -> None:
    """In-layer routing's weights (mean over layers) of the token each such row predicts next: what produced it."""
    if mixture.last_layer_weights is not None:
        for row, seq in enumerate(seqs):
            if seq.policy.layer_rule is not None:
                seq.weights = mixture.last_layer_weights[row]


def _hidden_layers(seqs: list[SequenceState]) -> tuple[int, ...]:
    return tuple(sorted({s.policy.hidden_layer for s in seqs if s.policy.hidden_layer is not None}))


class ModelRunner:
    """Runs prefill work and decode steps on one RoutedModel, keeping time spent in each."""

    def __init__(self, mixture):
        self.mx = mixture
        self.timing = {"prefill": 0.0, "decode": 0.0, "routing": 0.0}

    def _tensors(self, texts: list[list[int]]):
        ids, mask = left_pad(texts, self.mx.pad_id)
        device = self.mx.device
        return ids.to(device), mask.to(device), left_padded_positions(mask).to(device)

    def _packs(self, texts: list[list[int]]) -> bool:
        """Whether whole prompts go in one packed row: padding would waste enough, and attention takes a mask."""
        attention = getattr(self.mx.model.config, "_attn_implementation", None)
        return attention == "sdpa" and worth_packing([len(text) for text in texts])

    def _chunk_tensors(self, job: PrefillJob, start: int, end: int):
        device = self.mx.device
        ids = torch.tensor([job.text[start:end]], device=device)
        mask = torch.ones((1, end), dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device).unsqueeze(0)
        return ids, mask, positions

    def routing_pass(self, work: Work) -> list[PrefillJob]:
        """The base model alone over prompts, up to their routing layer: each sequence's sum of its prompt's
        layer-L states. Returns the jobs whose whole prompt is through."""
        seqs = [job.seq for job in work.jobs]
        layers = _hidden_layers(seqs)
        start = time.perf_counter()
        if work.chunk is None:
            texts = [job.text for job in work.jobs]
            if self._packs(texts):
                packed = pack(texts, self.mx.device)
                states = self.mx.base_hidden_states(packed.ids, packed.mask, packed.positions, layers, packed=packed)
                sums = {layer: segment_sums(state.float(), packed).cpu() for layer, state in states.items()}
            else:
                ids, mask, positions = self._tensors(texts)
                states = self.mx.base_hidden_states(ids, mask, positions, layers)
                sums = {layer: masked_sum(state.float(), mask).cpu() for layer, state in states.items()}
            for row, job in enumerate(work.jobs):
                job.seq.hidden_sum = sums[job.seq.policy.hidden_layer][row]
                job.seq.hidden_count = len(job.text)
            done = work.jobs
        else:
            (job,), (begin, end) = work.jobs, work.chunk
            if job.cache is None:
                from transformers import DynamicCache

                job.cache = DynamicCache(config=self.mx.model.config)
            ids, mask, positions = self._chunk_tensors(job, begin, end)
            states = self.mx.base_hidden_states(ids, mask, positions, layers, cache=job.cache)
            piece = states[job.seq.policy.hidden_layer][0].float().sum(dim=0).cpu()
            job.seq.hidden_sum = piece if begin == 0 else job.seq.hidden_sum + piece
            job.seq.hidden_count = end
            job.done = end
            done = [job] if end == len(job.text) else []
        self.timing["routing"] += time.perf_counter() - start
        return done

    def mixture_pass(self, work: Work, lanes: dict[str, Lane]) -> list[PrefillJob]:
        """The mixture over whole texts or one chunk, under each sequence's weights; finished prefills join their
        lane with the logits of their next token. Returns the jobs that joined."""
        mx = self.mx
        seqs = [job.seq for job in work.jobs]
        weights = stacked_weights(seqs)
        # a re-run (decode=recompute) processes one token no pass has yet: hidden routing counts it
        again = [s for s in seqs if s.step > 0 and s.policy.hidden_layer is not None]
        start = time.perf_counter()
        texts, layer_rows, packed = [job.text for job in work.jobs], _layer_rows(seqs), None
        # weights per token exist in exact mode only; in-layer rules and re-runs need a row per sequence
        row_per_sequence = bool(again) or layer_rows is not None or work.jobs[0].merge != "exact"
        if work.chunk is None and not row_per_sequence and self._packs(texts):
            packed = pack(texts, mx.device)
        if packed is not None:
            ids, mask, positions, cache = packed.ids, packed.mask, packed.positions, None
        elif work.chunk is None:
            ids, mask, positions = self._tensors(texts)
            cache = None
        else:
            (job,), (begin, end) = work.jobs, work.chunk
            ids, mask, positions = self._chunk_tensors(job, begin, end)
            cache = job.cache
        finishing = work.chunk is None or work.chunk[1] == len(work.jobs[0].text)
        capture = _hidden_layers(again) if finishing else ()
        logits, cache, hidden = mx.forward(
            ids, mask, positions, cache, weights, work.jobs[0].merge, capture=capture, layer_rows=layer_rows,
            packed=packed,
        )  # fmt: skip
        if packed is not None:  # each sequence its own left-padded row, as a padded pass leaves it
            unpack_cache(cache, packed)
            mask = self._tensors(texts)[1]
        self.timing["prefill"] += time.perf_counter() - start
        _take_layer_weights(mx, seqs)
        if not finishing:
            work.jobs[0].cache, work.jobs[0].done = cache, work.chunk[1]
            return []
        for row, seq in enumerate(seqs):
            if seq in again:
                seq.hidden_sum = seq.hidden_sum + hidden[seq.policy.hidden_layer][row, -1].float().cpu()
                seq.hidden_count += 1
            if seq.options.first_token_candidates and seq.step == 0:
                candidates = list(seq.options.first_token_candidates)
                seq.first_token_logprobs = logits[row].log_softmax(dim=-1)[candidates].cpu().tolist()
        lanes.setdefault(work.jobs[0].merge, Lane(work.jobs[0].merge)).join(seqs, mask, cache, logits)
        return work.jobs

    def run(self, work: Work, lanes: dict[str, Lane]) -> list[PrefillJob]:
        return self.routing_pass(work) if work.stage == ROUTING else self.mixture_pass(work, lanes)

    def decode(self, lane: Lane) -> None:
        """One token for every row of the lane: the logits of the next, and the hidden states routing follows."""
        mx = self.mx
        last = torch.tensor([[seq.token_ids[-1]] for seq in lane.rows], device=mx.device)
        lane.mask = torch.cat([lane.mask, torch.ones_like(last)], dim=1)
        positions = lane.mask.sum(dim=1, keepdim=True) - 1
        layers = _hidden_layers(lane.rows)
        start = time.perf_counter()
        lane.logits, lane.cache, hidden = mx.forward(
            last,
            lane.mask,
            positions,
            lane.cache,
            lane.weights(),
            lane.merge,
            capture=layers,
            layer_rows=_layer_rows(lane.rows),
        )
        self.timing["decode"] += time.perf_counter() - start
        _take_layer_weights(mx, lane.rows)
        latest = {layer: state[:, -1].float().cpu() for layer, state in hidden.items()}  # one copy per layer
        for row, seq in enumerate(lane.rows):  # hidden routing: the token just processed joins the running mean
            if seq.policy.hidden_layer is not None:
                seq.hidden_sum = seq.hidden_sum + latest[seq.policy.hidden_layer][row]
                seq.hidden_count += 1
