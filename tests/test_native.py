"""The native library (`loramix.native`): FBGEMM's fp16 product on several threads, bit for bit torch's
one-thread product at every row count, with and without a bias; built once into the loramix home; where it cannot
be built, None and torch's product, never an error."""

from __future__ import annotations

import copy
import os
import platform

import pytest
import torch

from loramix import native
from loramix.cpu_kernels import HalfWeightLinear, fbgemm_fp16_available, pack_fp16_linears

x86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(not (x86 and fbgemm_fp16_available()), reason="FBGEMM's fp16 product is x86 only")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() built anew into an empty loramix home (and forgotten again after the test)."""
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path))
    native._load.cache_clear()
    yield tmp_path
    native._load.cache_clear()


def test_the_native_library_builds_here(fresh_library):
    """This machine has a C++ compiler and torch ships FBGEMM's headers: CI must not fall back silently."""
    if os.environ.get("CI") != "true" and native.library() is None:
        pytest.skip("no C++ compiler outside CI")
    assert native.library() is not None and native.status().startswith("in use")
    assert [path.suffix for path in (fresh_library / "native").iterdir()] == [".so"]


@pytest.mark.parametrize("rows", [1, 3, 16, 33, 130])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_products_on_any_thread_count_are_torchs_bit_for_bit(rows, threads, with_bias):
    if native.library() is None:
        pytest.skip("no C++ compiler here")
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1000, 96, generator=generator)  # 1000 columns: FBGEMM's blocks and a leftover fringe
    bias = torch.randn(1000, generator=generator) if with_bias else None
    x = torch.randn(rows, 96, generator=generator)
    packed = native.PackedHalf(weight, bias, threads, native.library())
    expected = torch.fbgemm_linear_fp16_weight_fp32_activation(x, torch.fbgemm_pack_gemm_matrix_fp16(weight), bias)
    assert torch.equal(packed(x), expected)
    assert torch.equal(packed(x.view(1, rows, 96)), expected.view(1, rows, 1000))  # leading dimensions kept


def test_without_a_compiler_there_is_no_native_library_and_layers_keep_torchs_product(fresh_library, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert native.library() is None and "no C++ compiler" in native.status() and "set CXX" in native.status()
    layer = torch.nn.Linear(64, 48)
    pack_fp16_linears(torch.nn.Sequential(layer))
    assert type(layer) is HalfWeightLinear and layer.kernel_max_rows == 32  # torch's one-thread kernel, as before
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight.float(), layer.bias), atol=1e-5)
    assert not (fresh_library / "native").exists() or not any((fresh_library / "native").iterdir())


def test_a_cache_it_cannot_write_to_leaves_torchs_products_with_the_reason(fresh_library, monkeypatch):
    (fresh_library / "native").write_text("a file where the folder would go")
    assert native.library() is None and "could not be written" in native.status()


def test_loramix_native_0_turns_the_native_library_off(fresh_library, monkeypatch):
    monkeypatch.setenv("LORAMIX_NATIVE", "0")
    assert native.library() is None and native.status() == "off (LORAMIX_NATIVE=0)"


def test_a_layer_with_the_native_library_takes_every_row_count_through_fbgemm():
    if native.library() is None:
        pytest.skip("no C++ compiler here")
    layer = torch.nn.Linear(64, 48)
    pack_fp16_linears(torch.nn.Sequential(layer))
    assert isinstance(layer.kernel, native.PackedHalf) and layer.kernel_max_rows == float("inf")
    many = torch.randn(2, 300, 64)
    assert torch.allclose(layer(many), torch.nn.functional.linear(many, layer.weight.float(), layer.bias), atol=1e-5)
    with pytest.raises(TypeError, match="not copied"):
        copy.deepcopy(layer.kernel)


# ---- the small operators of a decode step, against torch's and transformers' own ----

needs_library = pytest.mark.skipif(
    not (x86 and fbgemm_fp16_available()) or native.library() is None, reason="no native library here"
)


@needs_library
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_is_the_residual_and_transformers_rmsnorm(with_delta):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(0)
    h, delta = torch.randn(2, 3, 96, generator=generator).unbind(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.rand(96, generator=generator) + 0.5
    summed, normed = native.add_rms(h, delta if with_delta else None, norm.weight.detach(), 1e-5)
    expected = h + delta if with_delta else h
    assert torch.equal(summed, expected) and summed.data_ptr() != h.data_ptr()
    assert torch.allclose(normed, norm(expected), rtol=1e-6, atol=1e-6)


@needs_library
def test_rope_is_transformers_rotation_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(1)
    rows, heads, dim = 3, 4, 16
    q = torch.randn(rows, heads, 1, dim, generator=generator)
    angles = torch.rand(rows, 1, dim // 2, generator=generator) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)  # cos, sin [rows, 1, dim] unsqueezed to the heads
    ours = native.rope(q.reshape(rows, heads * dim).clone(), heads, cos.view(rows, dim), sin.view(rows, dim))
    assert torch.equal(ours.view(rows, heads, 1, dim), expected)


@needs_library
def test_silu_mul_and_the_experts_mixture_are_torchs_to_rounding():
    generator = torch.Generator().manual_seed(2)
    gate, up = torch.randn(2, 5, 300, generator=generator).unbind(0)
    assert torch.allclose(native.silu_mul(gate.clone(), up, 2), torch.nn.functional.silu(gate) * up, atol=1e-6)
    for rows, rank in ((1, 24), (5, 24), (16, 24), (33, 64)):  # four-row blocks, rows after them; 33: on threads
        x, a = torch.randn(rows, 96, generator=generator), torch.randn(rank, 96, generator=generator)
        b, scale = torch.randn(80, rank, generator=generator), torch.randn(rows, rank, generator=generator)
        y = torch.randn(rows, 80, generator=generator)
        expected = y + torch.nn.functional.linear(torch.nn.functional.linear(x, a) * scale, b)
        ours = native.lora(x, a, scale, b.t().contiguous(), y, 2)
        assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-4)


@needs_library
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("length", [7, 300])  # 300: rows and heads shared among threads
@pytest.mark.parametrize("with_room", [False, True])  # keys and values as views of a cache with room after them
def test_attend_is_sdpa_of_one_query_with_grouped_heads_and_padding(padded, length, with_room):
    generator = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, dim = 3, 6, 2, 32
    q = torch.randn(rows, heads, 1, dim, generator=generator)
    room = torch.randn(2, rows, kv_heads, length + 5 * with_room, dim, generator=generator)
    keys, values = room[..., :length, :].unbind(0)
    mask = torch.ones(rows, length, dtype=torch.bool)
    if padded:
        mask[0, :4], mask[2, :1] = False, False  # left padding, as a joined batch has
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask[:, None, None, :], scale=0.3, enable_gqa=True
    )
    ours = native.attend(
        q.reshape(rows, heads * dim), keys, values, mask.to(torch.uint8) if padded else None, 0.3, heads, 2
    )
    assert torch.allclose(ours, expected.reshape(rows, heads * dim), rtol=1e-5, atol=1e-5)
