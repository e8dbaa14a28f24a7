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
            return native.lora(x, module.lora_A, state.scale_a.view(len(x), -1), b_t, y, threads)
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
    room, length = getattr(layer, "loramix_room", None), layer.keys.shape[-2]
    if room is None or room[0] is not layer.keys or room[1] is not layer.values or room[2].shape[-2] <= length:
        room = [None, None] + [_with_room(tensor, length + KV_ROOM) for tensor in (layer.keys, layer.values)]
    native.append(room[2], length, key)
    native.append(room[3], length, value)
    layer.keys, layer.values = room[0], room[1] = room[2].narrow(2, 0, length + 1), room[3].narrow(2, 0, length + 1)
    layer.loramix_room = room
    return layer.keys, layer.values


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
        inner, rows = self.model.model, input_ids.shape[0]
        h = inner.embed_tokens(input_ids)
        cos, sin = (part.reshape(rows, -1).contiguous() for part in inner.rotary_emb(h, position_ids=position_ids))
        h = h.view(rows, -1)
        mask = None if bool(attention_mask.all()) else attention_mask.to(torch.uint8).contiguous()
        hidden, mlp_out = {}, None
        for index, parts in enumerate(self.layers):
            h, x = native.add_rms(h, mlp_out, parts[0].weight, parts[0].variance_epsilon)
            if index in capture:  # transformers' hidden_states[index]: the input of layer `index`
                hidden[index] = h.view(rows, 1, -1)
            h, mlp_out = self._layer(parts, index, h, x, cos, sin, mask, cache)
        h, x = native.add_rms(h, mlp_out, inner.norm.weight, inner.norm.variance_epsilon)
        if len(self.layers) in capture:  # transformers' last hidden state is the normed one
            hidden[len(self.layers)] = x.view(rows, 1, -1)
        return self.model.lm_head(x).float(), hidden

    def _layer(self, parts, index: int, h, x, cos, sin, mask, cache) -> tuple[torch.Tensor, torch.Tensor]:
        _, post_norm, scaling, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = parts
        rows, dim, kv_heads = h.shape[0], self.head_dim, self.kv_heads
        q = native.rope(q_proj(x), self.heads, cos, sin)
        k = native.rope(k_proj(x), kv_heads, cos, sin)
        keys, values = _append(cache, index, k.view(rows, kv_heads, 1, dim), v_proj(x).view(rows, kv_heads, 1, dim))
        out = native.attend(q, keys, values, mask, scaling, self.heads, self.threads)
        h, x = native.add_rms(h, o_proj(out), post_norm.weight, post_norm.variance_epsilon)
        return h, down_proj(native.silu_mul(gate_proj(x), up_proj(x), self.threads))
