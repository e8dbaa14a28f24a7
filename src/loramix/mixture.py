"""The mixture layer: every adapted Linear holds all experts' LoRA matrices stacked, and adds their
weighted low-rank delta for a whole batch with per-sequence weights. No merged weight matrix is ever built.

With expert i having A_i [r_i, in], B_i [out, r_i], scaling s_i and routing weight w_i:

- exact  : delta(x) = sum_i w_i s_i B_i A_i x                  (PEFT combination_type="cat")
- linear : (sum_j c_j B_j)(sum_i c_i A_i) x, c_i = sqrt(w_i s_i)  (PEFT >= 0.7 combination_type="linear")
- peft04 : (sum_j B_j)(sum_i w_i s_i A_i) x                      (PEFT 0.4.0, what the reference code ran;
           first spelled `paper`, which still works)

All three are two small matmuls per token: `exact` multiplies by the stacked matrices with a per-row scale in
between; the merged modes build each row's A' and B' once per routing step and apply them with bmm / baddbmm.
Under `exact`, rows routed inside the layer (`layer_router`: Arrow, SpectR) get their weights per token from the
layer's own input, w_i(x) in place of w_i, their w_i then being its prior.
"""

from __future__ import annotations

import torch
from torch import nn

from loramix.adapters import ExpertAdapter
from loramix.errors import LoramixError
from loramix.layer_router import expert_spectrum, layer_weights

MERGE_MODES, DEFAULT_MERGE = ("exact", "linear", "paper"), "exact"
MERGE_ALIASES = {"peft04": "paper"}  # PEFT 0.4.0's merge; "paper", its first spelling, keeps results' names and keys


def canonical_merge(mode: str) -> str:
    """A merge mode's name as results are keyed by; raises on a name that is no merge mode (the one check)."""
    mode = MERGE_ALIASES.get(mode, mode)
    if mode not in MERGE_MODES:
        raise LoramixError(f"Unknown merge mode '{mode}'; choose one of exact, linear or peft04.")
    return mode


class MixtureState:
    """Mixing coefficients shared by all mixture layers of one model, set once per routing step."""

    def __init__(self, ranks: list[int], scalings: list[float], mode: str = DEFAULT_MERGE):
        self.ranks, self.n_experts = ranks, len(ranks)
        self.scalings = torch.tensor(scalings, dtype=torch.float32)
        self.version = 0  # bumped by every change, so layers rebuild their per-row factors lazily
        self.enabled = False  # experts off until weights are set
        self.set_mode(mode)
        self.coef_a: torch.Tensor | None = None  # [b, n]: weights of the A side
        self.coef_b: torch.Tensor | None = None  # [b, n]: weights of the B side (merged modes)
        self.scale_a: torch.Tensor | None = None  # [b, 1, R]: coef_a spread over each expert's rank columns
        self.layer_rows: torch.Tensor | None = None  # [b, 1, 1]: each row's in-layer rule (LAYER_RULES), 0 none
        self.layer_codes: tuple[int, ...] = ()  # the rule codes present in layer_rows
        self.log_prior: torch.Tensor | None = None  # [b, 1, n]: log of the pass's weights, the in-layer rules' prior
        self.layer_record: list[torch.Tensor] = []  # each layer's [b, n] weights of the last position

    def check_mode(self, mode: str) -> None:
        """Refuse a merge mode these experts cannot be mixed in."""
        mode = canonical_merge(mode)
        if mode != "exact" and len(set(self.ranks)) > 1:
            raise LoramixError(
                f"Merge mode '{mode}' needs experts of equal rank, but the ranks are {self.ranks}. "
                "Use --merge exact (it mixes any ranks exactly) or retrain the experts with one rank."
            )

    def set_mode(self, mode: str) -> None:
        self.check_mode(mode)
        self.mode, self.version = canonical_merge(mode), self.version + 1
        if self.enabled:  # the coefficients depend on the mode: recompute them from the last weights
            self.set_weights(*self._last)

    def set_weights(self, weights: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        """weights: [batch, n_experts] routing weights, or None to switch the experts off (base model)."""
        self.version += 1
        if weights is None:
            self.enabled = False
            return
        if weights.dim() != 2 or weights.shape[1] != self.n_experts:
            raise LoramixError(f"Routing weights must be [batch, {self.n_experts}], got {tuple(weights.shape)}.")
        self._last = (weights, dtype, device)
        scaled = weights.float() * self.scalings  # w_i * s_i
        if self.mode == "exact":
            coef_a, coef_b = scaled, None
        elif self.mode == "linear":
            root = scaled.abs().sqrt()
            coef_a, coef_b = root * scaled.sign(), root  # the sign goes on one side only, as PEFT does
        else:  # paper
            coef_a, coef_b = scaled, torch.ones_like(scaled)
        self.coef_a = coef_a.to(device=device, dtype=dtype)
        self.coef_b = None if coef_b is None else coef_b.to(device=device, dtype=dtype)
        self.scale_a = self.coef_a.repeat_interleave(torch.tensor(self.ranks, device=device), dim=1).unsqueeze(1)
        self.enabled = True

    def spread(self, rows: torch.Tensor) -> None:
        """Sequences packed into one row (`loramix.packing`, exact mode): token t takes sequence rows[t]'s scale."""
        self.scale_a, self.version = self.scale_a[rows].view(1, len(rows), -1), self.version + 1


class MixtureLinear(nn.Module):
    """A base Linear plus the routed mixture of all experts' LoRA deltas."""

    def __init__(self, base: nn.Module, lora_A, lora_B, state: MixtureState, prototypes=None, gram=None):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", lora_A, persistent=False)  # [R, in]: experts' A stacked by rows
        self.register_buffer("lora_B", lora_B, persistent=False)  # [out, R]: experts' B stacked by columns
        self.register_buffer("prototypes", prototypes, persistent=False)  # [n, in]: Arrow's, inside the layer
        self.register_buffer("gram", gram, persistent=False)  # [R, R] block-diagonal: SpectR's, inside the layer
        self.state = state
        self._factors_version = -1
        self._merged_A: torch.Tensor | None = None  # [b, in, r]: (sum_i a_i A_i)^T per row
        self._merged_B: torch.Tensor | None = None  # [b, r, out]: (sum_j b_j B_j)^T per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, self.base(x))

    def mix(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The base layer's output `out` for x plus the experts' delta (added in place under `exact`)."""
        state = self.state
        if not state.enabled:
            return out
        if state.coef_b is None:  # exact: two matmuls against the stacks, the per-row scale in between
            h = nn.functional.linear(x, self.lora_A)
            h.mul_(state.scale_a if state.layer_rows is None else self._layer_scale(x, h))
            return out.add_(nn.functional.linear(h, self.lora_B))
        if self._factors_version != state.version:
            self._build_merged_factors()
        return torch.baddbmm(out, torch.bmm(x, self._merged_A), self._merged_B)

    def _layer_scale(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """[b, t, R]: each token's scale, from this layer's own routing for the rows that use it."""
        state = self.state
        rows, codes, prior = state.layer_rows, state.layer_codes, state.log_prior
        weights = layer_weights(rows, codes, x, h, self.prototypes, self.gram, state.ranks, prior)
        state.layer_record.append(weights[:, -1])
        scaled = (weights * state.scalings.to(weights.device)).to(x.dtype)
        scaled = scaled.repeat_interleave(torch.tensor(state.ranks, device=x.device), dim=-1)
        return torch.where(state.layer_rows > 0, scaled, state.scale_a)

    def _build_merged_factors(self) -> None:
        """Merged modes: A' = sum_i a_i A_i and B' = sum_j b_j B_j for every row, once per routing step."""
        state = self.state
        n, r = state.n_experts, state.ranks[0]
        self._merged_A = torch.einsum("bn,nri->bir", state.coef_a, self.lora_A.view(n, r, -1))  # A: [n, r, in]
        self._merged_B = torch.einsum("bn,onr->bro", state.coef_b, self.lora_B.view(-1, n, r))  # B: [out, n, r]
        self._factors_version = state.version


def _stack(experts: list[ExpertAdapter], module_name: str, base: nn.Module):
    """The experts' A and B of one module stacked, and each one's Arrow prototype and SpectR gram block there (zeros
    for an expert that does not adapt this module: it contributes nothing here)."""
    in_features, out_features = base.in_features, base.out_features
    parts = []
    for expert in experts:
        pair = expert.modules.get(module_name)
        A = pair.A if pair else torch.zeros(expert.rank, in_features)
        B = pair.B if pair else torch.zeros(out_features, expert.rank)
        if A.shape[1] != in_features or B.shape[0] != out_features:
            raise LoramixError(
                f"Expert '{expert.name}' does not fit this base model: {module_name} is {in_features}->{out_features} "
                f"but the adapter is {A.shape[1]}->{B.shape[0]}. It was trained on another base model."
            )
        parts.append((A, B, *expert_spectrum(A, B)))
    blocks_A, blocks_B, prototypes, grams = zip(*parts)
    return torch.cat(blocks_A, dim=0), torch.cat(blocks_B, dim=1), torch.stack(prototypes), torch.block_diag(*grams)


def attach_experts(model: nn.Module, experts: list[ExpertAdapter], mode: str = "exact") -> MixtureState:
    """Replace every Linear that any expert adapts with a MixtureLinear; returns the shared state."""
    if not experts:
        raise LoramixError("At least one expert is needed to build a mixture.")
    if any(isinstance(m, MixtureLinear) for m in model.modules()):
        raise LoramixError("This model already has experts attached; call detach_experts first.")
    state = MixtureState([e.rank for e in experts], [e.scaling for e in experts], mode)
    module_names = sorted({name for expert in experts for name in expert.modules})
    modules = dict(model.named_modules())
    missing = [name for name in module_names if name not in modules]
    if missing:
        raise LoramixError(
            f"The experts adapt modules this base model does not have (e.g. {missing[0]}); "
            "they were trained on another base model."
        )
    reference = next(model.parameters())
    for name in module_names:
        base = modules[name]
        if not hasattr(base, "in_features"):
            raise LoramixError(f"Module {name} is a {type(base).__name__}; only Linear layers can carry experts.")
        A, B, prototypes, gram = (tensor.to(reference) for tensor in _stack(experts, name, base))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MixtureLinear(base, A, B, state, prototypes, gram))
    return state


def detach_experts(model: nn.Module) -> None:
    """Put the original Linear layers back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MixtureLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
