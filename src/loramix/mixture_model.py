"""The model under routing: a base causal LM whose adapted Linears are `MixtureLinear`s (`loramix.mixture`), with
the bundle's routers beside it. One forward pass runs under per-row weights set just before it.

    logits, cache, hidden = model.forward(ids, mask, positions, cache, weights [b, n_experts], merge, capture)

Hidden-state routing also needs the base model's own states (experts off) for a prompt, up to layer L only:
`base_hidden_states` stops the pass right after layer L, so `hidden:2` costs 2 of 30 layers, not all of them.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from pathlib import Path

import torch

from loramix.adapters import ExpertAdapter, check_same_base
from loramix.bundle import Bundle, resolve_bundle
from loramix.centroids import load_centroids
from loramix.cpu_kernels import weight_dtype
from loramix.decode_step import LeanDecoder
from loramix.errors import LoramixError
from loramix.hardware import describe, resolve_device, resolve_dtype
from loramix.hidden_router import HIDDEN_ROUTER_FILE, HiddenRouter
from loramix.mixture import MixtureState, attach_experts
from loramix.models import base_model_signature, load_base_model
from loramix.native_step import native_prefill
from loramix.packing import Packed, attention_per_sequence
from loramix.router import CentroidRouter, Embedder


class _ReachedLayer(Exception):
    """Raised by a forward hook to end a pass once the deepest layer wanted has run."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers (the first ModuleList as long as config.num_hidden_layers)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    return None


class RoutedModel:
    """A base causal LM with LoRA experts attached, mixed by whatever weights each forward pass is given."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        experts: list[ExpertAdapter],
        router: CentroidRouter | None,
        merge: str = "exact",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.expert_names = [e.name for e in experts]
        self.state: MixtureState = attach_experts(model, experts, merge)
        self._merge = merge
        self.router = router
        self.hidden_router: HiddenRouter | None = None  # set by from_bundle when the bundle has one
        self.bundle: Bundle | None = None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype  # the arithmetic's (fp32 around fp16 weights on a CPU)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.context_limit: int | None = getattr(model.config, "max_position_embeddings", None)
        self.n_layers: int = model.config.num_hidden_layers
        self._layers = decoder_layers(model)
        self.decoder = LeanDecoder.build(model)  # decode steps without transformers' plumbing, where it is equal
        # transformers 5 renamed past_key_values to cache (not every architecture yet); the cache is updated in place
        self._cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # One forward pass at a time: the weights and merge mode are set on the shared layers just before it.
        self._forward_lock = threading.Lock()
        self._loaded_weights: torch.Tensor | None = None
        self.last_layer_weights: torch.Tensor | None = None  # [b, n]: in-layer routing's weights, the last pass

    @classmethod
    def from_bundle(
        cls,
        path: str | Path | None = None,
        merge: str = "exact",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        with_router: bool = True,
        embedder_dtype: str = "auto",
    ):
        """Load a bundle (the default one if `path` is None): base model, experts, routers.

        device / dtype: torch's, or the names `--device` / `--dtype` take ("auto": `loramix.hardware`); the
        library's default is the exactness reference, fp32 on the CPU.

        embedder_dtype: "fp32" reproduces the reference's routing exactly; "bf16" is ~1.8x cheaper routing on
        CPUs with native bf16 (similarities within ~2e-5); "auto" picks bf16 there and fp32 elsewhere (GPUs included).
        """
        device = resolve_device(device) if isinstance(device, str) else device
        dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
        bundle = Bundle.load(resolve_bundle(path))
        model, tokenizer = load_base_model(bundle.base_model, dtype=dtype, device=device)
        experts = bundle.load_experts(next(model.parameters()).dtype)
        check_same_base(experts, base_model_signature(model), bundle.base_model)
        router = None
        if with_router:
            router = CentroidRouter(Embedder(bundle.embedder, device, embedder_dtype), bundle.load_centroids())
        mixture = cls(model, tokenizer, experts, router, merge)
        mixture.bundle = bundle
        hidden = bundle.root / HIDDEN_ROUTER_FILE
        if hidden.is_file():
            mixture.hidden_router = HiddenRouter(load_centroids(hidden, len(bundle.expert_names), rank=3))
        return mixture

    @property
    def merge(self) -> str:
        """The merge mode of sequences that do not choose one."""
        return self._merge

    def set_merge(self, mode: str) -> None:
        self.state.check_mode(mode)
        self._merge = mode

    def forward(
        self, input_ids, attention_mask, position_ids, cache, weights=None, merge: str | None = None,
        capture: tuple[int, ...] = (), layer_rows: torch.Tensor | None = None, packed: Packed | None = None,
    ):  # fmt: skip
        """Logits of the last position [batch, vocab], the KV cache (a new one if `cache` is None), and the hidden
        states after each layer in `capture` ({layer: [batch, seq, hidden]}, for hidden-state routing).

        weights: [batch, n_experts] routing weights for this pass (None: experts off); merge: the merge mode
        (None: the model's). Both are set on the shared mixture layers inside the same lock as the pass.
        layer_rows: [batch], each row's rule of routing inside each layer (`runner._layer_rows`); their weights for
        the next token, averaged over the layers, are left in `last_layer_weights` [batch, n_experts].
        packed: several sequences in one row (`loramix.packing`, exact mode, no in-layer rules, no capture): the
        weights are per sequence, and the logits [n, vocab] those of each sequence's last token.
        """
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        with self._forward_lock, torch.no_grad():
            if merge is not None and merge != self.state.mode:
                self.state.set_mode(merge)
                self._loaded_weights = None
            if weights is not self._loaded_weights or weights is None or packed is not None:
                self.set_weights(weights)
                # weights spread over a packed pass's tokens hold for that pass only: the next one sets them again
                self._loaded_weights = weights if packed is None else None
            if packed is not None and weights is not None:
                self.state.spread(packed.rows)
            state = self.state
            state.layer_rows = None if layer_rows is None else layer_rows.view(-1, 1, 1).to(self.device)
            state.layer_codes = () if layer_rows is None else tuple(sorted(set(layer_rows.tolist()) - {0}))
            state.log_prior = None  # in-layer rows take their weights as a prior; no other pass needs their log
            if layer_rows is not None and weights is not None:
                state.log_prior = weights.float().log().unsqueeze(1).to(self.device)
            state.layer_record = []
            one_token = input_ids.shape[1] == 1
            if self.decoder is not None and (
                one_token or packed is None and native_prefill(self.decoder, input_ids, attention_mask, state)
            ):
                logits, hidden = self.decoder.step(input_ids, attention_mask, position_ids, cache, capture)
            else:
                with _per_sequence(self.model, packed):
                    out = self.model(
                        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                        logits_to_keep=1 if packed is None else packed.ends, output_hidden_states=bool(capture),
                        **{self._cache_keyword: cache},
                    )  # fmt: skip
                hidden = {layer: out.hidden_states[layer] for layer in capture}
                logits = (out.logits[:, -1, :] if packed is None else out.logits[0]).float()
            records, state.layer_rows, state.layer_record = state.layer_record, None, []
        self.last_layer_weights = torch.stack(records).mean(dim=0).cpu() if records else None
        if logits.is_cuda:  # so the time of the forward pass is counted as such, not in whatever waits next
            torch.cuda.synchronize(logits.device)
        return logits, cache, hidden

    def base_hidden_states(
        self, input_ids, attention_mask, position_ids, layers: tuple[int, ...], cache=None, packed: Packed | None = None
    ) -> dict:
        """{layer: [batch, seq, hidden]}: the base model's own states (experts off: what the centroids were built
        from) after each layer in `layers`. The pass ends after the deepest of them; `cache` (optional) keeps
        the keys and values of the layers that ran, so a long prompt can be taken in chunks; `packed`: the pass is
        that packed row (`loramix.packing`)."""
        deepest = max(layers)
        seen: dict[int, torch.Tensor] = {}
        hooks = []
        if deepest < self.n_layers and self._layers is not None:  # hidden_states[L] is the output of layer L - 1

            def keep(index):
                def hook(module, args, output):
                    seen[index + 1] = output[0] if isinstance(output, tuple) else output
                    if index + 1 == deepest:
                        raise _ReachedLayer

                return hook

            hooks = [self._layers[i].register_forward_hook(keep(i)) for i in range(deepest) if i + 1 in layers]
        with self._forward_lock, torch.no_grad():
            self.set_weights(None)
            try:
                with _per_sequence(self.model, packed):
                    out = self.model(
                        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=cache is not None, logits_to_keep=1, output_hidden_states=not hooks,
                        **{self._cache_keyword: cache},
                    )  # fmt: skip
                seen = {layer: out.hidden_states[layer] for layer in layers}
            except _ReachedLayer:
                pass
            finally:
                for hook in hooks:
                    hook.remove()
        return seen

    def set_weights(self, weights: torch.Tensor | None) -> None:
        self.state.set_weights(weights, self.dtype, self.device)
        self._loaded_weights = None

    @property
    def placement(self) -> dict:
        """Where this model runs: device, dtype, hardware (recorded in results)."""
        return describe(self.device, weight_dtype(self.model))

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        limit = self.context_limit
        if limit is not None and prompt_tokens + max_new_tokens > limit:
            raise LoramixError(
                f"A prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the model's "
                f"{limit}-token context; shorten the prompt or lower --max-new-tokens."
            )


def _per_sequence(model: torch.nn.Module, packed: Packed | None):
    """A packed pass's attention, each sequence on its own (`packing.attention_per_sequence`); else as it is."""
    return contextlib.nullcontext() if packed is None else attention_per_sequence(model, packed)
