"""Routing inside each layer, per token, from the layer's own input (Arrow, Ostapenko et al. 2024): no router model
and no centroids, only the experts' own weights.

Each expert's prototype in a layer is the top right singular vector v_i of its delta B_i A_i (exact, from a QR of
A_i^T and the SVD of the small B_i R^T). A token x gets, in that layer, the k experts of largest |<x, v_i>| (the sign
of a singular vector means nothing) and softmax weights over them:

    w(x) = softmax(topk(|x V^T|) / T)        (the others 0; PEFT's defaults: k = 3, T = 1)

`route=arrow` uses it in loramix's engine, batched beside every other route; the eval config `arrow` runs PEFT's own
implementation (`baselines.py`), which it is tested against.
"""

from __future__ import annotations

import torch

ARROW_TOP_K = 3
ARROW_TEMPERATURE = 1.0


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[in]: the top right singular vector of B @ A (A [r, in], B [out, r]) without forming it."""
    A32, B32 = A.float(), B.float()
    if not A32.any() or not B32.any():
        return torch.zeros(A32.shape[1])
    Q, R = torch.linalg.qr(A32.T)  # A^T = Q R, so B A = (B R^T) Q^T
    _, _, Vh = torch.linalg.svd(B32 @ R.T, full_matrices=False)
    return Q @ Vh[0]


def arrow_weights(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """x [..., in], prototypes [n, in] -> [..., n] weights: softmax over the top-k |<x, v_i>|, the others 0."""
    scores = (x @ prototypes.T.to(x.dtype)).abs().float()
    top = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    weights = torch.zeros_like(scores)
    return weights.scatter(-1, top.indices, (top.values / temperature).softmax(dim=-1))
