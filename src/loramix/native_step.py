"""The lean decode step in loramix's native kernels (`loramix.native`), for fp16 weights on an x86 CPU.

The layer of `loramix.decode_step` (its docstring has the maths), with each run of small operators one native call:

    h, x = add_rms(h, mlp_out, input_norm)           # the last layer's residual, then this layer's RMSNorm
    q, k, v = q_proj(x), k_proj(x), v_proj(x);  rope(q), rope(k);  K, V = append(cache, k, v)
    h, x' = add_rms(h, o_proj(attend(q, K, V, mask)), post_norm)
    mlp_out = down(silu_mul(gate(x'), up(x')))

where every projection is FBGEMM's product on all threads (torch's bit for bit) plus, where experts attach, their
mixture (`lora`: exact mode; merged modes and in-layer rules go through the module's own `mix`). Torch spends ~5
microseconds of dispatch on each of the ~1,500 operators of a step on a small CPU, about as long as the step's
products take (BENCHMARKS.md, "Native kernels"); here a layer is ~15 calls. The norms, softmax and SiLU sum and
round in their own order, so the logits agree with transformers' step to float rounding (tested), not bit for bit.
"""

from __future__ import annotations

import torch

from loramix import native
from loramix.mixture import MixtureLinear

KV_ROOM = 64  # tokens of room each layer's keys and values keep after their length, so a step appends in place
PREFILL_MAX_PAIRS = 32 * 1024  # new tokens x keys up to which a prefill takes the native step (its attention is
# plain loops: past that, SDPA's kernel is faster)


def native_prefill(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, state) -> bool:
    """Whether a pass of several new tokens a row goes through the native step: a short prompt or chunk, the
    experts off or mixed `exact` without in-layer rules (merged modes build per-row factors for one token a row)."""
    mixes_per_token = state.enabled and (state.coef_b is not None or state.layer_rows is not None)
    short = input_ids.shape[1] * attention_mask.shape[1] <= PREFILL_MAX_PAIRS
    return getattr(decoder, "native", None) is not None and short and not mixes_per_token


def _product(module: torch.nn.Module, threads: int):
    """x [rows, in] -> [rows, out]: the module's fp16 weight through FBGEMM, plus its experts' mixture."""
    if not isinstance(module, MixtureLinear):
        return module.kernel
    kernel, state = module.base.kernel, module.state
    b_t = module.lora_B.t().contiguous()  # B^T [rank, out]: the native mixture adds B's rows, contiguous

    def product(x: torch.Tensor) -> torch.Tensor:
        y = kernel(x)
        if not state.enabled:
            return y
        if state.coef_b is None and state.layer_rows is None and state.scale_a.shape[1] == 1:
            scale = state.scale_a  # [rows, 1, R]: a decode step's rows; a prefill's tokens each take their row's
            if len(scale) == len(x):
                scale = scale.view(len(x), -1)
            else:  # the expanded view has stride 0 over tokens: the native mixture reads it contiguous
                scale = scale.expand(-1, len(x) // len(scale), -1).reshape(len(x), -1).contiguous()
            return native.lora(x, module.lora_A, scale, b_t, y, threads)
        return module.mix(x.unsqueeze(1), y.unsqueeze(1)).squeeze(1)  # merged modes, in-layer rules: its own maths

    return product


def _append(cache, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `cache.update` of one layer, written in place into room kept after its keys and values: a
    `torch.cat` copies a layer's whole cache at every step (6 of a 16-row step's ~90 ms). The layer's keys and
    values become views of the room, which everyone else reads as plain tensors; whoever sets other tensors there
    (rows leaving, a batch joining, a prefill's own update) makes the next step take new room."""
    layer = cache.layers[index]
    if getattr(layer, "keys", None) is None:  # an empty cache (a prompt's first token): transformers' own start
        return cache.update(key, value, index)
    room, length, new = getattr(layer, "loramix_room", None), layer.keys.shape[-2], key.shape[-2]
    if room is None or room[0] is not layer.keys or room[1] is not layer.values or room[2].shape[-2] < length + new:
        room = [None, None] + [_with_room(tensor, length + new + KV_ROOM) for tensor in (layer.keys, layer.values)]
    if new == 1:
        native.append(room[2], length, key)
        native.append(room[3], length, value)
    else:  # a chunk of a prompt
        room[2][..., length : length + new, :], room[3][..., length : length + new, :] = key, value
    layer.keys, layer.values = room[0], room[1] = room[2].narrow(2, 0, length + new), room[3].narrow(2, 0, length + new)
    layer.loramix_room = room
    return layer.keys, layer.values


def _per_head(states: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    """[rows * T, heads * dim] -> [rows, heads, T, dim] (a view), as the cache keeps keys and values."""
    return states.view(rows, -1, heads, states.shape[-1] // heads).transpose(1, 2)


def _with_room(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    spacious = tensor.new_empty(*tensor.shape[:-2], capacity, tensor.shape[-1])
    spacious[..., : tensor.shape[-2], :] = tensor
    return spacious


class NativeStep:
    """`LeanDecoder.step` of a Llama-shaped model whose Linears are `HalfWeightLinear`s, in native kernels."""

    def __init__(self, model: torch.nn.Module, heads: int, kv_heads: int, head_dim: int):
        self.model, self.heads, self.kv_heads, self.head_dim = model, heads, kv_heads, head_dim
        self.threads = torch.get_num_threads()  # for the larger operators (the step itself runs torch on one)
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)
            projections += (mlp.down_proj,)
            self.layers.append((*norms, attn.scaling, *(_product(module, self.threads) for module in projections)))

    def step(self, input_ids, attention_mask, position_ids, cache, capture: tuple[int, ...] = ()):
        """Logits [rows, vocab] after the last of `input_ids` [rows, T] (T = 1: a decode step; more: a short prompt
        or chunk, `native_prefill`), the hidden states in `capture` ({layer: [rows, T, d]}); the cache grows by T."""
        inner, (rows, width) = self.model.model, input_ids.shape
        h = inner.embed_tokens(input_ids)
        tokens = rows * width
        cos, sin = (part.reshape(tokens, -1).contiguous() for part in inner.rotary_emb(h, position_ids=position_ids))
        h = h.view(tokens, -1)
        mask = None if bool(attention_mask.all()) else attention_mask.to(torch.uint8).contiguous()
        hidden, mlp_out = {}, None
        for index, parts in enumerate(self.layers):
            h, x = native.add_rms(h, mlp_out, parts[0].weight, parts[0].variance_epsilon)
            if index in capture:  # transformers' hidden_states[index]: the input of layer `index`
                hidden[index] = h.view(rows, width, -1)
            h, mlp_out = self._layer(parts, index, h, x, cos, sin, mask, cache, rows)
        h, x = native.add_rms(h, mlp_out, inner.norm.weight, inner.norm.variance_epsilon)
        if len(self.layers) in capture:  # transformers' last hidden state is the normed one
            hidden[len(self.layers)] = x.view(rows, width, -1)
        return self.model.lm_head(x.view(rows, width, -1)[:, -1]).float(), hidden

    def _layer(self, parts, index: int, h, x, cos, sin, mask, cache, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, post_norm, scaling, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = parts
        kv_heads = self.kv_heads
        q = native.rope(q_proj(x), self.heads, cos, sin)
        k = native.rope(k_proj(x), kv_heads, cos, sin)
        keys, values = _append(cache, index, _per_head(k, rows, kv_heads), _per_head(v_proj(x), rows, kv_heads))
        out = native.attend(q, keys, values, mask, scaling, self.heads, self.threads)
        h, x = native.add_rms(h, o_proj(out), post_norm.weight, post_norm.variance_epsilon)
        return h, down_proj(native.silu_mul(gate_proj(x), up_proj(x), self.threads))
