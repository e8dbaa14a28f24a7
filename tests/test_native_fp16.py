"""The native fp16 shim (`loramix.native_fp16`): FBGEMM's fp16 product on several threads, bit for bit torch's
one-thread product at every row count, with and without a bias; built once into the loramix home; where it cannot
be built, None and torch's product, never an error."""

from __future__ import annotations

import copy
import os
import platform

import pytest
import torch

from loramix import native_fp16
from loramix.cpu_kernels import HalfWeightLinear, fbgemm_fp16_available, pack_fp16_linears

x86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(not (x86 and fbgemm_fp16_available()), reason="FBGEMM's fp16 product is x86 only")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() built anew into an empty loramix home (and forgotten again after the test)."""
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path))
    native_fp16.library.cache_clear()
    yield tmp_path
    native_fp16.library.cache_clear()


def test_the_shim_builds_here(fresh_library):
    """This machine has a C++ compiler and torch ships FBGEMM's headers: CI must not fall back silently."""
    if os.environ.get("CI") != "true" and native_fp16.library() is None:
        pytest.skip("no C++ compiler outside CI")
    assert native_fp16.library() is not None
    assert [path.suffix for path in (fresh_library / "native").iterdir()] == [".so"]


@pytest.mark.parametrize("rows", [1, 3, 16, 33, 130])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_products_on_any_thread_count_are_torchs_bit_for_bit(rows, threads, with_bias):
    if native_fp16.library() is None:
        pytest.skip("no C++ compiler here")
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1000, 96, generator=generator)  # 1000 columns: FBGEMM's blocks and a leftover fringe
    bias = torch.randn(1000, generator=generator) if with_bias else None
    x = torch.randn(rows, 96, generator=generator)
    packed = native_fp16.PackedHalf(weight, bias, threads, native_fp16.library())
    expected = torch.fbgemm_linear_fp16_weight_fp32_activation(x, torch.fbgemm_pack_gemm_matrix_fp16(weight), bias)
    assert torch.equal(packed(x), expected)
    assert torch.equal(packed(x.view(1, rows, 96)), expected.view(1, rows, 1000))  # leading dimensions kept


def test_without_a_compiler_there_is_no_shim_and_layers_keep_torchs_product(fresh_library, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert native_fp16.library() is None
    layer = torch.nn.Linear(64, 48)
    pack_fp16_linears(torch.nn.Sequential(layer))
    assert type(layer) is HalfWeightLinear and layer.kernel_max_rows == 32  # torch's one-thread kernel, as before
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight.float(), layer.bias), atol=1e-5)
    assert not (fresh_library / "native").exists() or not any((fresh_library / "native").iterdir())


def test_loramix_native_0_turns_the_shim_off(fresh_library, monkeypatch):
    monkeypatch.setenv("LORAMIX_NATIVE", "0")
    assert native_fp16.library() is None


def test_a_layer_with_the_shim_takes_every_row_count_through_fbgemm():
    if native_fp16.library() is None:
        pytest.skip("no C++ compiler here")
    layer = torch.nn.Linear(64, 48)
    pack_fp16_linears(torch.nn.Sequential(layer))
    assert isinstance(layer.kernel, native_fp16.PackedHalf) and layer.kernel_max_rows == float("inf")
    many = torch.randn(2, 300, 64)
    assert torch.allclose(layer(many), torch.nn.functional.linear(many, layer.weight.float(), layer.bias), atol=1e-5)
    with pytest.raises(TypeError, match="not copied"):
        copy.deepcopy(layer.kernel)
