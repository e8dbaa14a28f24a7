"""A lean decode step for Llama-architecture models (Llama, Mistral, Qwen2) on a CPU: one new token per row through
every layer, the same arithmetic as transformers' forward pass without its per-module plumbing.

On a small CPU a decode step of SmolLM2-135M spends as long in glue as in its matrix products: ~2,000 small
operators, each wrapped in module calls, mask building and output recording (BENCHMARKS.md, "A lean decode
step"). Here one layer is, for a hidden state h [b, 1, d] at positions p [b, 1]:

    x = rmsnorm(h);  q, k, v = q_proj(x), k_proj(x), v_proj(x);  q, k = rope(q, p), rope(k, p)
    K, V = cache.update(k, v);  h = h + o_proj(sdpa(q, K, V, mask));  h = h + down(silu(gate(x')) * up(x'))

with x' = rmsnorm(h), each projection the model's own module (`MixtureLinear` where experts attach, so every merge
mode and in-layer rule mixes exactly as on the full path), rope transformers' rotation with the same products,
attention the same SDPA call with the same mask (none without padding, the padding mask otherwise): the logits
are transformers', bit for bit. `LeanDecoder.build` returns one only for models whose layers have exactly this
shape, and only after a decode step through it has matched transformers' (`check`).

With fp16 weights on a CPU (`cpu_kernels.HalfWeightLinear`) and loramix's native library built, the step is
`native_step.NativeStep`'s: this layer in native kernels, to float rounding. Without that library every product of
the step is torch's one-thread FBGEMM call, and the rest is too small to share: the step runs on one thread, so that
attention and the experts' products do not wake the others (measured 41 against 46 ms per step at one row).
"""

from __future__ import annotations

import contextlib
from copy import deepcopy

import torch

from loramix import native
from loramix.cpu_kernels import HalfWeightLinear
from loramix.mixture import MixtureLinear
from loramix.native_step import NativeStep

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")  # transformers' layers of this shape (Qwen2: with q/k/v biases)
ONE_THREAD_MAX_KEYS = 16 * 1024  # rows x context up to which attention is too small to gain from more threads
LAYER_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj", "mlp.act_fn", "input_layernorm", "post_attention_layernorm",
)  # fmt: skip


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.base if isinstance(module, MixtureLinear) else module


@contextlib.contextmanager
def _threads(count: int | None):
    if count is None or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _module_product(module: torch.nn.Module):
    return module.forward


def _kernel_product(module: torch.nn.Module):
    """The projection with its fp16 weight's FBGEMM kernel called directly (no module call in between)."""
    kernel = _base(module).kernel
    return (lambda x: module.mix(x, kernel(x))) if isinstance(module, MixtureLinear) else kernel


def _layer_parts(layer: torch.nn.Module, product) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return (
        layer.input_layernorm, product(attn.q_proj), product(attn.k_proj), product(attn.v_proj),
        product(attn.o_proj), attn.scaling, layer.post_attention_layernorm, product(mlp.gate_proj),
        product(mlp.up_proj), product(mlp.down_proj), mlp.act_fn,
    )  # fmt: skip


def _rope_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [b, 1, 1, head_dim] of rotary embedding, sin's first half negated: transformers' rotate_half(x) *
    sin, cat(-x2, x1) * sin, is then x.roll(half) * that: one operator in place of four, the same numbers."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, signed_sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _attention(q, keys, values, mask, scaling) -> torch.Tensor:
    """Grouped-query attention of one query per row, called as transformers calls SDPA (so with its numbers):
    without a mask, with SDPA's own grouping; with one, the heads that share a key head as that head's queries."""
    rows, heads, _, dim = q.shape
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mask is None and dim <= 256:
        return sdpa(q, keys, values, scale=scaling, enable_gqa=heads != keys.shape[1])
    return sdpa(q.view(rows, keys.shape[1], -1, dim), keys, values, attn_mask=mask, scale=scaling)


def _rms(norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), norm.weight, norm.variance_epsilon)


class LeanDecoder:
    """The decode step of one Llama-architecture model (`build` it; None where it does not apply)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        config, inner = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        probe = _base(inner.layers[0].mlp.down_proj)
        self.half_weights = isinstance(probe, HalfWeightLinear)
        self.kernel_max_rows = probe.kernel_max_rows if self.half_weights else 0  # rows the `fast` plan takes
        # each layer's parts, looked up once (a step would otherwise spend a millisecond in nn.Module lookups), with
        # its products as module calls (`plain`) and, for fp16 weights and few rows, as FBGEMM's kernel (`fast`)
        self.plain = [_layer_parts(layer, _module_product) for layer in inner.layers]
        self.fast = (
            [_layer_parts(layer, _kernel_product) for layer in inner.layers] if self.half_weights else self.plain
        )
        # fp16 weights on all threads (`loramix.native` built): the whole step in native kernels
        native_kernels = self.half_weights and isinstance(probe.kernel, native.PackedHalf)
        self.native = NativeStep(model, self.heads, self.kv_heads, self.head_dim) if native_kernels else None

    @classmethod
    def build(cls, model: torch.nn.Module) -> LeanDecoder | None:
        """The lean step for this model, or None: not a plain Llama, not on a CPU, or not equal to its forward."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
            return None
        if not _plain_llama(model, config):
            return None
        if next(model.parameters()).device.type != "cpu":
            return None  # on a GPU, transformers' own step until it is measured there (scripts/gpu_check.sh)
        decoder = cls(model)
        return decoder if decoder.check() else None

    def step(self, input_ids, attention_mask, position_ids, cache, capture: tuple[int, ...] = ()):
        """Logits [b, vocab] of the token after `input_ids` [b, 1] and the hidden states after each layer in
        `capture` ({layer: [b, 1, d]}, as transformers' `hidden_states[layer]`); the cache grows by one token. With
        the native step, `input_ids` may be [b, T] (`native_step.native_prefill`): the states are then [b, T, d]."""
        rows, keys = attention_mask.shape
        if self.native is not None:  # its products take every thread themselves; the rest is one-thread work
            with torch.no_grad(), _threads(1):
                return self.native.step(input_ids, attention_mask, position_ids, cache, capture)
        one_thread = rows <= self.kernel_max_rows and rows * keys <= ONE_THREAD_MAX_KEYS
        with torch.no_grad(), _threads(1 if one_thread else None):
            return self._step(input_ids, attention_mask, position_ids, cache, capture)

    def _step(self, input_ids, attention_mask, position_ids, cache, capture):
        inner = self.model.model
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, position_ids=position_ids)
        rope = _rope_factors(cos, sin)
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        hidden = {0: h} if 0 in capture else {}
        layers = self.fast if input_ids.shape[0] <= self.kernel_max_rows else self.plain
        for index, parts in enumerate(layers):
            h = self._layer(parts, index, h, rope, mask, cache)
            if index + 1 in capture:
                hidden[index + 1] = h
        h = _rms(inner.norm, h)
        if len(layers) in capture:  # transformers' last hidden state is the normed one
            hidden[len(layers)] = h
        return self.model.lm_head(h)[:, -1, :].float(), hidden

    def _layer(self, parts, index: int, h, rope, mask, cache) -> torch.Tensor:
        norm, q_proj, k_proj, v_proj, o_proj, scaling, post_norm, gate_proj, up_proj, down_proj, act = parts
        rows, dim, heads, kv_heads = h.shape[0], self.head_dim, self.heads, self.kv_heads
        x = _rms(norm, h)
        q = _rotate(q_proj(x).view(rows, heads, 1, dim), rope)
        k = _rotate(k_proj(x).view(rows, kv_heads, 1, dim), rope)
        keys, values = cache.update(k, v_proj(x).view(rows, kv_heads, 1, dim), index)
        out = _attention(q, keys, values, mask, scaling)
        h = h + o_proj(out.view(rows, 1, heads * dim))
        x = _rms(post_norm, h)
        return h + down_proj(act(gate_proj(x)) * up_proj(x))

    def check(self) -> bool:
        """One decode step through both paths on a short random text (experts as they are): equal logits?"""
        from transformers import DynamicCache

        model, config = self.model, self.model.config
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (2, 4), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 0] = 0  # one row left-padded, as a joined batch has
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            cache = DynamicCache(config=config)
            model(input_ids=ids[:, :3], attention_mask=mask[:, :3], position_ids=positions[:, :3], cache=cache)
            copy = deepcopy(cache)  # one prefill for both paths
            full = model(input_ids=ids[:, 3:], attention_mask=mask, position_ids=positions[:, 3:], cache=cache)
            lean, _ = self.step(ids[:, 3:], mask, positions[:, 3:], copy)
        expected = full.logits[:, -1, :].float()
        return bool(torch.allclose(lean, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())))


def _plain_llama(model: torch.nn.Module, config) -> bool:
    """Layers of exactly the shape `LeanDecoder` runs: SiLU gate, full attention everywhere (no sliding window, whose
    mask differs only past the window), one TP rank, transformers' SDPA attention. Biases are the modules' own."""
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "_attn_implementation", "sdpa") != "sdpa":
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return False
    try:
        for layer in inner.layers:
            for name in LAYER_MODULES:
                layer.get_submodule(name)
    except AttributeError:
        return False
    return True
