"""A router on the base model's own hidden states: no second model, and almost no cost.

Each expert's centroid is the mean, over its task's training texts, of the base model's hidden state at layer L
mean-pooled over each text's tokens (experts off). While generating, a sequence's running mean of its layer-L
hidden states (taken from the forward passes already being run) is compared with the centroids by *centered*
cosine similarity: the mean of the centroids is subtracted from both sides first, since every hidden state
shares a large common direction that would make all raw cosines ~1.

    s_i = cos(h - mu, c_i - mu),   mu = mean_i c_i

Layer L is `hidden_states[L]` as transformers defines it (0: the embeddings; the last one after the final norm).
The running mean lags one token (the newest token's hidden state comes out of the pass that uses the weights),
and the prompt's own mean comes from one pass over the prompt with the experts off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramix.errors import LoramixError

HIDDEN_ROUTER_FILE = "router_hidden.safetensors"


def masked_sum(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, seq, d], [b, seq] -> [b, d]: the sum over each row's real tokens (padding, mask 0, left out). The one
    pooling of hidden states: centroids take its mean, routing keeps a running sum."""
    return (hidden * mask.to(hidden.dtype).unsqueeze(-1)).sum(dim=1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, seq, d], [b, seq] -> [b, d]: the mean over each row's real tokens."""
    return masked_sum(hidden, mask) / mask.sum(dim=1, keepdim=True).to(hidden.dtype).clamp(min=1)


@torch.no_grad()
def build_hidden_centroids(
    model, tokenizer, texts_by_expert: dict[str, Sequence[str]], batch_size: int = 8, max_length: int = 512,
    progress=None,
) -> torch.Tensor:  # fmt: skip
    """[n_layers + 1, n_experts, hidden]: per layer, the mean over each expert's texts of the token-mean hidden
    state (experts off: call on the plain base model). Pads on the right or left alike (masked)."""
    device = next(model.parameters()).device
    rows = []
    for name, texts in texts_by_expert.items():
        if not texts:
            raise LoramixError(f"Expert '{name}' has no texts to build its hidden-state centroid from.")
        total = None
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                max_length=max_length,
            ).to(device)  # fmt: skip
            out = model(**batch, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            pooled = torch.stack([masked_mean(h.float(), batch.attention_mask) for h in out.hidden_states])
            total = pooled.sum(dim=1) if total is None else total + pooled.sum(dim=1)
            if progress:
                progress(len(texts[start : start + batch_size]))
        rows.append(total / len(texts))
    return torch.stack(rows, dim=1).cpu()


class HiddenRouter:
    """Centered cosine similarity of pooled hidden states to each expert's centroid, at a chosen layer."""

    def __init__(self, centroids: torch.Tensor):
        self.centroids = centroids  # [n_layers + 1, n_experts, hidden]
        self._centered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_layers(self) -> int:
        return self.centroids.shape[0] - 1

    def _at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._centered:
            if not 1 <= layer <= self.n_layers:
                raise LoramixError(f"Hidden routing layer {layer} is outside 1..{self.n_layers}.")
            rows = self.centroids[layer]
            mu = rows.mean(dim=0)
            self._centered[layer] = (mu, torch.nn.functional.normalize(rows - mu, dim=-1))
        return self._centered[layer]

    def similarities(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        """[b, hidden] pooled states -> [b, n_experts] centered cosine similarities."""
        mu, unit = self._at(layer)
        return torch.nn.functional.normalize(pooled.float().cpu() - mu, dim=-1) @ unit.T
