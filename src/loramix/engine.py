"""Continuous batching: sequences join and leave the running batches between steps.

One `step()`:
1. the tokens picked last step are fed: the sequences whose re-route is due get new weights (one router call for
   all); under decode=recompute they go back to prefill on their whole text under the new weights, the others
   advance one token, one pass per lane (cancelled ones leave first);
2. admit waiting sequences while the budgets allow (`loramix.scheduler`); those on text routes are routed on
   their prompts now (one embedder call), those with fixed weights get them;
3. prefill within the step's token budget (`loramix.runner`): hidden-route newcomers first run the base model up
   to their routing layer and are routed on the prompt's states; then the mixture's own prefill, whole prompts
   together or one chunk of a long one; finished prefills join their lane;
4. every running sequence picks its next token from its last logits (`loramix.sampler`); finished and cancelled
   ones leave. The step ends here, so each token reaches its caller before the pass that feeds it.

Isolation: a failure that belongs to some sequences (their sampling, routing or prefill) ends those sequences
alone, with an error event; the others go on as if they had been alone. `GenerationStream` is this loop with
every sequence admitted at once; the server feeds it as requests come.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from loramix.runner import Lane, ModelRunner, left_pad, left_padded_positions
from loramix.sampler import GREEDY_BELOW, choose_token, greedy_tokens, token_logprobs
from loramix.scheduler import MIXTURE, ROUTING, Budgets, ChunkSizer, Scheduler
from loramix.sequences import SequenceState, TokenEvent

__all__ = ["Budgets", "Engine", "left_pad", "left_padded_positions"]


class Engine:
    """Steps any number of sequences on one RoutedModel; sequences may be added and cancelled between steps."""

    def __init__(
        self, mixture, max_batch: int | None = None, max_batch_tokens: int | None = None,
        prefill_chunk: int | None = None, prefill_seconds: float | None = None,
    ):  # fmt: skip
        self.mx = mixture
        self.runner = ModelRunner(mixture)
        budgets = Budgets(max_batch, max_batch_tokens, prefill_chunk, prefill_seconds)
        self.scheduler = Scheduler(budgets)
        self.chunks = ChunkSizer(prefill_chunk, prefill_seconds)
        self.lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()  # add/cancel may come from other threads than the one stepping
        self._failed: list[TokenEvent] = []  # sequences ended by a failure since the last step's events
        self.reroutes = 0
        self.steps = 0

    # ---- what callers use ----

    @property
    def timing(self) -> dict[str, float]:
        return self.runner.timing

    @property
    def waiting(self):
        return self.scheduler.waiting

    def add(self, seq: SequenceState) -> None:
        with self._lock:
            self.scheduler.waiting.append(seq)

    def cancel(self, seq: SequenceState) -> None:
        """The sequence leaves the batch at the next step (its KV cache rows are freed then)."""
        seq.cancelled = True

    @property
    def running(self) -> int:
        """Sequences admitted: decoding, or prefilling."""
        return sum(len(lane.rows) for lane in self.lanes.values()) + len(self.scheduler.prefilling)

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.waiting) or self.running > 0

    def step(self) -> list[TokenEvent]:
        """Feed the tokens picked last step (re-route, one decode pass), admit who fits, prefill within the budget,
        and give every running sequence its next token. The pass comes first so that a token goes out as soon as it
        is picked, not one decode pass later (a first token included)."""
        self._advance()
        self._admit()
        self._prefill()
        events: list[TokenEvent] = []
        for lane in self.lanes.values():
            events += self._pick_tokens(lane)
        self.steps += 1
        events += self._failed
        self._failed = []
        return events

    # ---- the parts of a step ----

    def _admit(self) -> None:
        decoding = [seq for lane in self.lanes.values() for seq in lane.rows]
        with self._lock:
            admitted = self.scheduler.admit(decoding)
        if not admitted:
            return
        self._guarded(self._route, [seq for seq in admitted if seq.reroutes_at(0) and seq.policy.needs_text_router])
        for seq in admitted:
            if seq.finished:
                continue
            if seq.policy.kind == "fixed":
                seq.weights = torch.tensor(seq.policy.fixed, dtype=torch.float32)
            elif seq.policy.layer_rule is not None:  # each layer's prior: the prompt's weights, else flat
                flat = torch.full((seq.policy.n_experts,), 1.0 / seq.policy.n_experts)
                seq.prior = seq.weights = seq.weights if seq.policy.kind == "prompt" else flat
            stage = ROUTING if seq.policy.hidden_layer is not None else MIXTURE
            self.scheduler.prefill(seq, seq.prompt_ids, seq.options.merge or self.mx.merge, stage)

    def _prefill(self) -> None:
        """Prefill passes until the step's budget of prompt tokens is spent (or nothing is left to prefill). With
        nothing decoding there is no stream to keep flowing, and a whole prompt in one pass is the fastest way to
        its first token: no budget then."""
        budget = self.chunks.budget()
        if not any(lane.rows for lane in self.lanes.values()):
            budget = None
        while (budget is None or budget > 0) and (work := self.scheduler.next_work(budget)):
            if budget is not None:
                budget -= work.tokens
            jobs = [job for job in work.jobs]
            began = time.perf_counter()
            through = self._guarded_work(work)
            self.chunks.observe_prefill(work.tokens, time.perf_counter() - began)
            if work.stage == ROUTING:
                self._guarded(self._route, [job.seq for job in through])
            for job in jobs:
                if job.seq.finished:
                    self.scheduler.prefilling.remove(job)
                elif job in through:
                    self.scheduler.finish_stage(job)

    def _pick_tokens(self, lane: Lane) -> list[TokenEvent]:
        events, keep = [], []
        greedy = greedy_tokens(lane.logits) if lane.rows else []
        for row, seq in enumerate(lane.rows):
            if seq.cancelled:
                continue
            try:
                events.append(self._pick(seq, lane.logits[row], greedy[row]))
            except Exception as exc:  # noqa: BLE001 - this sequence alone ends; the batch goes on
                events.append(seq.fail(_describe(exc)))
            if not seq.finished:
                keep.append(row)
        lane.keep(keep)
        return events

    def _pick(self, seq: SequenceState, logits: torch.Tensor, greedy: int | None) -> TokenEvent:
        """`greedy`: the row's argmax from the whole lane's (None where its logits are not finite)."""
        options = seq.options
        banned = seq.banned_tokens(self.mx.eos_ids)
        if options.forced:  # teacher forcing: the gold token, whatever the model prefers
            token_id = options.forced[seq.step]
        elif greedy is not None and options.temperature < GREEDY_BELOW and greedy not in banned:
            token_id = greedy  # what choose_token gives (the first largest logit), from one pass over the lane
        else:
            token_id = choose_token(logits, options.temperature, options.top_p, seq.generator, banned)
        if options.logprobs is not None:
            logprob, top = token_logprobs(logits, token_id, options.logprobs)
            seq.token_logprobs.append(logprob)
        event = seq.append(token_id, self.mx.eos_ids, rerouted=seq.reroutes_at(seq.step))
        if options.logprobs is not None:
            event.logprob, event.top_logprobs = logprob, (top if options.logprobs else None)
        return event

    def _advance(self) -> None:
        for lane in self.lanes.values():  # cancelled since their last token: no pass for them
            if any(seq.cancelled for seq in lane.rows):
                lane.keep([i for i, seq in enumerate(lane.rows) if not seq.cancelled])
        due = [seq for lane in self.lanes.values() for seq in lane.rows if seq.reroutes_at(seq.step)]
        self._guarded(self._route, due)
        due = set(due)  # sequences compare by identity
        for lane in self.lanes.values():
            gone = [i for i, seq in enumerate(lane.rows) if seq.finished]  # failed while routing
            again = [i for i, seq in enumerate(lane.rows) if seq.options.decode == "recompute" and seq in due]
            if gone or again:  # a re-run goes back to prefill its whole text under the new weights
                for i in again:
                    seq = lane.rows[i]
                    if not seq.finished:
                        self.scheduler.prefill(seq, seq.prompt_ids + seq.token_ids, lane.merge, MIXTURE)
                lane.keep([i for i in range(len(lane.rows)) if i not in again and i not in gone])
            if any(seq in due for seq in lane.rows):
                lane.weights_changed()
            if lane.rows:
                try:
                    began = time.perf_counter()
                    self.runner.decode(lane)
                    self.chunks.observe_decode(time.perf_counter() - began)
                except Exception as exc:  # noqa: BLE001 - the lane's rows share its cache: they end, others go on
                    message = _describe(exc)
                    self._failed += [seq.fail(message) for seq in lane.rows]
                    lane.keep([])

    # ---- routing ----

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

    # ---- isolation ----

    def _guarded(self, action: Callable[[list[SequenceState]], None], seqs: list[SequenceState]) -> None:
        """Run `action` on these sequences together; if it fails, on each alone, ending the ones that still fail."""
        seqs = [seq for seq in seqs if not seq.finished]
        if not seqs:
            return
        try:
            action(seqs)
            return
        except Exception as exc:  # noqa: BLE001 - isolate below
            if len(seqs) == 1:
                self._failed.append(seqs[0].fail(_describe(exc)))
                return
        for seq in seqs:
            self._guarded(action, [seq])

    def _guarded_work(self, work) -> list:
        """Run one prefill pass; if it fails, its sequences end (a group is retried one by one first)."""
        try:
            return self.runner.run(work, self.lanes)
        except Exception as exc:  # noqa: BLE001 - isolate below
            if work.chunk is None and len(work.jobs) > 1:
                through = []
                for job in work.jobs:
                    through += self._guarded_work(type(work)(work.stage, [job]))
                return through
            message = _describe(exc)
            self._failed += [job.seq.fail(message) for job in work.jobs if not job.seq.finished]
            return []


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
