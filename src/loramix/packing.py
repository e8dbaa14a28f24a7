"""Prefill of several prompts packed into one row, without padding (the runner's whole-prompt passes).

Prompts of lengths l_1..l_n left-padded together cost n x max(l) rows of every product; packed end to end they cost
sum(l): on the loadtest's 16 prompts 448 rows instead of 624. In the packed row, token t belongs to sequence
rows[t] and sits at position t - start(rows[t]); attention is causal within a sequence and blind across them
(a block-diagonal mask). Each sequence's logits are those of its last token, and its keys and values are cut out
of the packed cache and left-padded into the rows of a running batch, as a padded prefill would have left them.

Attention in a packed pass (`attention_per_sequence`) takes each sequence on its own, causal, where SDPA under the
block-diagonal mask would score every pair of the row's T tokens: sum(l^2) in place of T^2 (on those 16 prompts, 17%
of the whole prefill went to the masked SDPA).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch

MAX_PACKED_TOKENS = 4096  # the mask is tokens x tokens booleans: 16 MB here; longer groups are padded as before
MIN_SAVING = 0.1  # pack only when padding would add at least this share of rows
PER_SEQUENCE_ATTENTION = "loramix_packed"  # the attention a packed pass runs (registered with transformers)
_lengths: ContextVar[list[int] | None] = ContextVar("loramix_packed_lengths", default=None)


@dataclass
class Packed:
    ids: torch.Tensor  # [1, T]: every prompt's tokens, end to end
    positions: torch.Tensor  # [1, T]: each token's position within its own prompt
    mask: torch.Tensor  # [1, 1, T, T]: causal within a prompt, nothing across
    rows: torch.Tensor  # [T]: the sequence each token belongs to
    lengths: list[int]

    @property
    def ends(self) -> torch.Tensor:
        """[n]: the index of each sequence's last token."""
        return torch.tensor(self.lengths, device=self.ids.device).cumsum(0) - 1


def worth_packing(lengths: list[int]) -> bool:
    padded = len(lengths) * max(lengths)
    return len(lengths) > 1 and sum(lengths) <= MAX_PACKED_TOKENS and padded - sum(lengths) >= MIN_SAVING * padded


def pack(texts: list[list[int]], device: torch.device) -> Packed:
    lengths = [len(text) for text in texts]
    rows = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor(lengths))
    positions = torch.cat([torch.arange(length) for length in lengths])
    total = len(rows)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = causal & (rows[:, None] == rows[None, :])
    ids = torch.tensor([token for text in texts for token in text])
    return Packed(ids.view(1, total).to(device), positions.view(1, total).to(device),
                  mask.view(1, 1, total, total).to(device), rows.to(device), lengths)  # fmt: skip


def segment_sums(states: torch.Tensor, packed: Packed) -> torch.Tensor:
    """[1, T, d] -> [n, d]: the sum of each sequence's states (hidden routing's prompt sums)."""
    sums = states.new_zeros(len(packed.lengths), states.shape[-1])
    return sums.index_add_(0, packed.rows, states[0])


def unpack_cache(cache, packed: Packed) -> None:
    """Cut each sequence's keys and values out of the packed cache [1, heads, T, dim] into left-padded rows
    [n, heads, max length, dim], in place (their mask is `runner.left_pad`'s for the same texts)."""
    width, starts = max(packed.lengths), [0, *torch.tensor(packed.lengths).cumsum(0).tolist()[:-1]]

    def rows_of(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.new_zeros(len(packed.lengths), tensor.shape[1], width, tensor.shape[3])
        for row, (start, length) in enumerate(zip(starts, packed.lengths)):
            out[row, :, width - length :] = tensor[0, :, start : start + length]
        return out

    for layer in cache.layers:
        layer.keys, layer.values = rows_of(layer.keys), rows_of(layer.values)


def _attention_per_sequence(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: q [1, heads, T, d] against k, v [1, kv_heads, T, d] of a packed row (a
    fresh cache: these tokens' keys only), each sequence causal on its own; [1, T, heads, d] as SDPA's caller has it."""
    parts, start = [], 0
    for length in _lengths.get():
        end = start + length
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        ))  # fmt: skip
        start = end
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def attention_per_sequence(model: torch.nn.Module, packed: Packed):
    """During a packed pass of `model` (an SDPA model; its caller holds the model's lock), its attention layers take
    each sequence on its own (`_attention_per_sequence`) instead of the dense block-diagonal mask."""
    from transformers import AttentionInterface

    AttentionInterface.register(PER_SEQUENCE_ATTENTION, _attention_per_sequence)
    config, token = model.config, _lengths.set(packed.lengths)
    before = config._attn_implementation
    config._attn_implementation = PER_SEQUENCE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        _lengths.reset(token)
