"""Routing inside each layer, per token, from the layer's own input: no router model and no centroids, only the
experts' own weights. Two rules, each a `--route` value:

arrow (Ostapenko et al. 2024): each expert's prototype in a layer is the top right singular vector v_i of its delta
B_i A_i (exact, from a QR of A_i^T and the SVD of the small B_i R^T). A token x gets, in that layer, the k experts of
largest |<x, v_i>| (the sign of a singular vector means nothing) and softmax weights over them:

    w(x) = softmax(topk(|x V^T|) / T)        (the others 0; PEFT's defaults: k = 3, T = 1)

spectr (Fleshman and Van Durme 2025): the whole spectrum instead of its top direction, the norm of the expert's
delta on x, each expert's divided by its top singular value sigma_i (so a token along v_i scores |<x, v_i>|, Arrow's
scale, and the other directions add in proportion to their singular values):

    score_i(x) = ||B_i A_i x|| / sigma_i = sqrt(h_i^T G_i h_i),  h_i = A_i x,  G_i = B_i^T B_i / sigma_i^2
    w(x) = softmax(topk(score(x)) / T)        (k = 3, T = 1, as Arrow)

h = A x is what the mixture layer computes anyway, so SpectR costs one [R, R] product per token and layer.

Either rule can take a prior p over the experts, the row's weights from routing its prompt (`--route
prompt:RULE+spectr`: task-level evidence from the prompt, token-level from each layer, as GLIDER and LORAUTER argue).
The prior multiplies the rule's softmax, i.e. its log adds to the scores:

    w(x) = softmax(topk(score(x) / T + log p))     (Arrow and SpectR alone: p uniform, which changes nothing)
`route=arrow` and `route=spectr` run in loramix's engine, batched beside every other route; the eval config `arrow`
runs PEFT's own Arrow (`baselines.py`), which `route=arrow` is tested against.
"""

from __future__ import annotations

import torch

ARROW_TOP_K = 3
ARROW_TEMPERATURE = 1.0


LAYER_RULES = ("arrow", "spectr")  # a row's code in MixtureState.layer_rows is its index here + 1 (0: not routed here)


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[in]: the top right singular vector of B @ A (A [r, in], B [out, r]) without forming it."""
    return expert_spectrum(A, B)[0]


def expert_spectrum(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow's prototype v [in] and SpectR's G = B^T B / sigma^2 [r, r] of the delta B @ A, without forming it."""
    A32, B32 = A.float(), B.float()
    if not A32.any() or not B32.any():
        return torch.zeros(A32.shape[1]), torch.zeros(A32.shape[0], A32.shape[0])
    Q, R = torch.linalg.qr(A32.T)  # A^T = Q R, so B A = (B R^T) Q^T
    _, S, Vh = torch.linalg.svd(B32 @ R.T, full_matrices=False)
    return Q @ Vh[0], B32.T @ B32 / S[0] ** 2


def top_k_softmax(scores: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """[..., n] scores -> weights: a softmax over the top-k, the others 0."""
    top = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    weights = torch.zeros_like(scores)
    return weights.scatter(-1, top.indices, (top.values / temperature).softmax(dim=-1))


def arrow_scores(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """x [..., in], prototypes [n, in] -> [..., n] scores |<x, v_i>|."""
    return (x @ prototypes.T.to(x.dtype)).abs().float()


def arrow_weights(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """x [..., in], prototypes [n, in] -> [..., n] weights: softmax over the top-k |<x, v_i>|, the others 0."""
    return top_k_softmax(arrow_scores(x, prototypes), top_k, temperature)


def spectr_scores(h: torch.Tensor, gram: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """h [..., R] (A x, the experts' ranks side by side), gram [R, R] (the G_i on its diagonal) -> [..., n] scores."""
    quadratic = (h @ gram.to(h.dtype)).mul_(h).float()  # [..., R]: h_i (G_i h_i) column by column
    per_expert = torch.stack([part.sum(dim=-1) for part in quadratic.split(ranks, dim=-1)], dim=-1)
    return per_expert.clamp_(min=0).sqrt_()


def layer_weights(rules, codes, x: torch.Tensor, h: torch.Tensor, prototypes, gram, ranks: list[int], log_prior):
    """[b, t, n]: each row's weights by its rule code (rules [b, 1, 1], `LAYER_RULES`; rows of code 0 get zeros,
    their own weights apply), under its prior (log_prior [b, 1, n]). Only the rules in `codes` (those some row
    uses, known on the host: no device sync per layer) are computed."""
    weights = torch.zeros(*h.shape[:-1], len(ranks), device=h.device)
    for code in codes:
        rule = LAYER_RULES[code - 1]
        scores = arrow_scores(x, prototypes) if rule == "arrow" else spectr_scores(h, gram, ranks)
        scores = scores / ARROW_TEMPERATURE + log_prior
        weights = torch.where(rules == code, top_k_softmax(scores, ARROW_TOP_K, 1.0), weights)
    return weights
