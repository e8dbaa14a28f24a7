"""Choosing one sequence's next token from its logits: greedy, or sampling with a temperature and nucleus (top-p).

A pure function of the logits and the sequence's own settings and generator, so one sequence's choice never
touches another's. Temperatures below GREEDY_BELOW are greedy (as vLLM does): dividing logits by 1e-40 overflows
float32 to inf and the softmax to NaN. Logits that are NaN or +inf cannot be sampled from; that raises
SamplingError, which ends that sequence alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GREEDY_BELOW = 1e-5


class SamplingError(RuntimeError):
    """This sequence's logits cannot give a token."""


def choose_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    banned: Sequence[int] = (),
) -> int:
    """logits [vocab] -> a token id. `banned` ids get no probability (end-of-sequence before min_new_tokens)."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise SamplingError("the model's logits for this sequence are not finite (NaN or infinity)")
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    top = logits.max()
    if not torch.isfinite(top):
        raise SamplingError("every token of this sequence's vocabulary is banned")
    probs = ((logits - top) / temperature).softmax(dim=-1)  # the largest term is exp(0): no overflow at any T
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy_tokens(logits: torch.Tensor) -> list[int | None]:
    """Each row's greedy token for a whole batch [rows, vocab], in four operators for all rows (`choose_token` takes
    five for each); None for a row whose logits are not finite (its `choose_token` then says why)."""
    unusable = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)
    best = logits.argmax(dim=-1)
    return [None if bad else token for bad, token in zip(unusable.tolist(), best.tolist())]


def token_logprobs(logits: torch.Tensor, token_id: int, alternatives: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability, and the `alternatives` likeliest tokens with theirs."""
    logprobs = logits.float().log_softmax(dim=-1)
    top = logprobs.topk(alternatives) if alternatives else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logprobs[token_id]), pairs
