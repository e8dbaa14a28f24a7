"""Who runs next: admission under the batch's budgets, and the prefill work of each step (vLLM's scheduler, small).

Budgets, each optional (None: unbounded):
- max_batch: sequences admitted at once (prefilling or decoding); more wait in the queue, first come first served.
- max_batch_tokens: the KV cache the admitted sequences may come to hold. A batch is padded to its longest
  row, so the bound is rows x the largest (prompt + max_new_tokens) among them; a newcomer that would pass it
  waits until enough sequences finish. `fits_alone` tells the server which requests can never fit (a 400).
- prefill_chunk: prompt tokens prefilled between two decode steps. A prompt longer than that is taken in chunks
  over several steps, so the sequences already decoding keep getting a token every step (chunked prefill).
- prefill_seconds: instead of a fixed chunk, `ChunkSizer` adapts it as it runs so that one step's prefill takes
  about this long (a token's cost grows with the context before it, and differs from machine to machine).

A newcomer on a hidden-state route is prefilled twice: first the base model alone up to its routing layer (to
route on the prompt's own states), then the mixture under the weights routed from them. Both stages are prefill
work in the same budget. Short prompts at the same stage are prefilled together in one padded pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loramix.sequences import SequenceState

ROUTING, MIXTURE = "routing", "mixture"  # the two stages of a prefill


@dataclass(frozen=True)
class Budgets:
    max_batch: int | None = None
    max_batch_tokens: int | None = None
    prefill_chunk: int | None = None
    prefill_seconds: float | None = None  # adapt the chunk to this time per step (when prefill_chunk is None)


@dataclass
class ChunkSizer:
    """The prefill budget of each step: a fixed chunk, or one adapted to the time a step's prefill may take.

    Adapting: a pass costs a fixed part (reading every weight once, whatever the tokens: measured on the decode
    passes) plus a part per token (measured on the prefill passes, net of the fixed part; it grows with the context
    a chunk attends to). The chunk is what fits the target: (target - fixed) / per token."""

    fixed: int | None
    target: float | None
    tokens: float = 64.0
    per_token: float | None = None  # seconds per prefill token, recently
    overhead: float = 0.0  # seconds of a pass whatever its tokens (a decode pass), recently
    smallest: int = 16
    largest: int = 4096

    def budget(self) -> int | None:
        if self.fixed is not None:
            return self.fixed
        if self.target is None:
            return None
        return int(self.tokens)

    def observe_decode(self, seconds: float) -> None:
        self.overhead = seconds if not self.overhead else 0.8 * self.overhead + 0.2 * seconds

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if self.fixed is not None or self.target is None or tokens <= 0:
            return
        per_token = max(seconds - self.overhead, 0.1 * seconds) / tokens
        self.per_token = per_token if self.per_token is None else 0.5 * self.per_token + 0.5 * per_token
        room = max(self.target - self.overhead, 0.25 * self.target)
        self.tokens = min(self.largest, max(self.smallest, room / self.per_token))


@dataclass(eq=False)
class PrefillJob:
    """One sequence's prefill: the tokens to run (its prompt, or its whole text for a decode=recompute re-run),
    how far each stage has got, and the private KV cache of a prefill taken in chunks."""

    seq: SequenceState
    text: list[int]
    merge: str
    stage: str = MIXTURE
    done: int = 0  # tokens of `text` through the current stage
    cache: object = None  # the current stage's KV cache while chunked

    @property
    def remaining(self) -> int:
        return len(self.text) - self.done


@dataclass
class Work:
    """One forward pass of prefill: whole texts of several fresh jobs (padded together), or the next chunk of one."""

    stage: str
    jobs: list[PrefillJob]
    chunk: tuple[int, int] | None = None  # (start, end) of the one job's text; None: every job's whole text

    @property
    def tokens(self) -> int:
        if self.chunk is not None:
            return self.chunk[1] - self.chunk[0]
        return len(self.jobs) * max(len(job.text) for job in self.jobs)


@dataclass
class Scheduler:
    budgets: Budgets = field(default_factory=Budgets)
    waiting: deque[SequenceState] = field(default_factory=deque)
    prefilling: list[PrefillJob] = field(default_factory=list)

    def fits_alone(self, seqs: list[SequenceState]) -> int | None:
        """The KV-cache tokens these sequences need together, if that is over max_batch_tokens (else None)."""
        limit = self.budgets.max_batch_tokens
        needed = len(seqs) * max((seq.reservation() for seq in seqs), default=0)
        return needed if limit is not None and needed > limit else None

    def admit(self, running: list[SequenceState]) -> list[SequenceState]:
        """Move sequences from the queue (in arrival order) into the batch while the budgets allow."""
        admitted: list[SequenceState] = []
        inside = running + [job.seq for job in self.prefilling]
        while self.waiting:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            if not self._room_for(seq, inside + admitted):
                break
            admitted.append(self.waiting.popleft())
        return admitted

    def _room_for(self, seq: SequenceState, inside: list[SequenceState]) -> bool:
        budgets = self.budgets
        if budgets.max_batch is not None and len(inside) >= budgets.max_batch:
            return False
        if budgets.max_batch_tokens is not None and inside:
            widest = max(seq.reservation(), *(other.reservation() for other in inside))
            if (len(inside) + 1) * widest > budgets.max_batch_tokens:
                return False
        return True

    def prefill(self, seq: SequenceState, text: list[int], merge: str, stage: str) -> None:
        self.prefilling.append(PrefillJob(seq, text, merge, stage))

    def next_work(self, budget: int | None) -> Work | None:
        """The next prefill pass for a step with `budget` tokens left (None: any). Fresh jobs whose whole text fits
        the budget go first (a short prompt never waits behind a long one's chunks), all of them together in one
        padded pass: one pass reads every weight once, so batching newcomers is where throughput comes from, and
        each of them is short. Else the first job in arrival order gets its next chunk."""
        self.prefilling = [job for job in self.prefilling if not job.seq.finished]
        if not self.prefilling:
            return None
        fresh = [job for job in self.prefilling if job.done == 0 and (budget is None or len(job.text) <= budget)]
        if fresh:
            head, group = fresh[0], [fresh[0]]
            for job in fresh[1:]:
                if job.stage != head.stage or (head.stage == MIXTURE and job.merge != head.merge):
                    continue
                group.append(job)
            return Work(head.stage, group)
        head = self.prefilling[0]
        end = len(head.text) if budget is None else min(len(head.text), head.done + budget)
        return Work(head.stage, [head], (head.done, end))

    def finish_stage(self, job: PrefillJob) -> None:
        """The job's current stage is through its whole text: the routing pass hands over to the mixture's."""
        job.done, job.cache = 0, None
        if job.stage == ROUTING:
            job.stage = MIXTURE
        else:
            self.prefilling.remove(job)

    @property
    def admitted_prefilling(self) -> list[SequenceState]:
        return [job.seq for job in self.prefilling]
