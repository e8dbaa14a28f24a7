"""Placement's CPU side: bf16 Linears on a CPU without bf16 instructions take the bf16 kernel for a few rows and
fp32 products of the same stored weights for more; fp16 weights take FBGEMM's product (without the native library:
for a few rows, and fp32 products for more) around fp32 activations; the auto dtype comes from a probe of both row
counts."""

from __future__ import annotations

import json

import pytest
import torch

from loramix import cpu_kernels, hardware, native
from loramix.cpu_kernels import (
    BF16_KERNEL_MAX_ROWS,
    HALF_KERNEL_MAX_ROWS,
    UPCAST_CHUNK,
    HalfWeightLinear,
    RowAdaptiveLinear,
    adapt_bf16_linears,
    fbgemm_fp16_available,
    pack_fp16_linears,
)

needs_fbgemm = pytest.mark.skipif(not fbgemm_fp16_available(), reason="FBGEMM's fp16 product is x86 (AVX2) only")


def _bf16_model(out_features: int = 48) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, out_features), torch.nn.ReLU(), torch.nn.Linear(out_features, 8))


def test_few_rows_take_the_bf16_kernel_and_many_rows_fp32_products_of_the_same_weights(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_has_native_bf16", lambda: False)
    width = 2 * UPCAST_CHUNK + 16  # three chunks of output rows
    model = torch.nn.Linear(32, width).to(torch.bfloat16)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reference = torch.nn.Linear(32, width).to(torch.bfloat16)
    reference.load_state_dict(state)
    assert adapt_bf16_linears(torch.nn.Sequential(model)) == 1 and type(model) is RowAdaptiveLinear
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    products = []  # (input dtype, output rows of the weight) of every product the layer runs
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: products.append((x.dtype, w.shape[0]))
                        or linear(x, w, b))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    few = torch.randn(1, BF16_KERNEL_MAX_ROWS, 32, generator=generator).to(torch.bfloat16)
    assert torch.equal(model(few), linear(few, reference.weight, reference.bias))  # the bf16 kernel itself
    assert products == [(torch.bfloat16, width)]
    products.clear()
    many = torch.randn(3, BF16_KERNEL_MAX_ROWS, 32, generator=generator).to(torch.bfloat16)
    ours = model(many)
    assert products == [(torch.float32, UPCAST_CHUNK), (torch.float32, UPCAST_CHUNK), (torch.float32, 16)]
    wide = linear(many.float(), reference.weight.float(), reference.bias.float())
    assert ours.dtype == torch.bfloat16 and ours.shape == (3, BF16_KERNEL_MAX_ROWS, width)
    assert torch.allclose(ours.float(), wide, rtol=2**-7, atol=1e-3)  # the same numbers up to bf16 rounding


@pytest.mark.parametrize(
    ("dtype", "native", "adapted"), [(torch.bfloat16, False, 2), (torch.bfloat16, True, 0), (torch.float32, False, 0)]
)
def test_only_bf16_models_on_cpus_without_bf16_instructions_are_adapted(monkeypatch, dtype, native, adapted):
    monkeypatch.setattr(cpu_kernels, "cpu_has_native_bf16", lambda: native)
    model = _bf16_model().to(dtype)
    assert adapt_bf16_linears(model) == adapted
    assert sum(type(m) is RowAdaptiveLinear for m in model.modules()) == adapted


@needs_fbgemm
def test_without_native_kernels_fp16_weights_take_torchs_fbgemm_for_few_rows_and_fp32_products_for_many(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)  # no compiler: torch's one-thread product
    width = UPCAST_CHUNK + 16  # two chunks of output rows
    model = torch.nn.Linear(32, width)
    rounded = model.weight.detach().half().float()  # what the layer must multiply by: the fp16 weight, exactly
    bias = model.bias.detach().clone()
    kernels = []
    fbgemm, linear = torch.fbgemm_linear_fp16_weight_fp32_activation, torch.nn.functional.linear
    monkeypatch.setattr(torch, "fbgemm_linear_fp16_weight_fp32_activation",
                        lambda *args: kernels.append("fbgemm") or fbgemm(*args))  # fmt: skip
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: kernels.append((x.dtype, w.shape[0]))
                        or linear(x, w, b))  # fmt: skip
    assert pack_fp16_linears(torch.nn.Sequential(model)) == 1 and type(model) is HalfWeightLinear
    assert model.weight.dtype == torch.float16 and model.bias.dtype == torch.float32
    generator = torch.Generator().manual_seed(1)
    few = torch.randn(1, HALF_KERNEL_MAX_ROWS, 32, generator=generator)
    assert torch.allclose(model(few), linear(few, rounded, bias), rtol=1e-5, atol=1e-5)  # fp32 arithmetic
    assert kernels == ["fbgemm"]
    kernels.clear()
    many = torch.randn(2, HALF_KERNEL_MAX_ROWS, 32, generator=generator)
    ours = model(many)
    assert kernels == [(torch.float32, UPCAST_CHUNK), (torch.float32, 16)]
    assert ours.dtype == torch.float32 and torch.allclose(ours, linear(many, rounded, bias), rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_fp16_weights_leave_a_tied_embedding_in_fp32(tiny_base):
    from loramix.cpu_kernels import weight_dtype
    from loramix.models import load_base_model

    exact, _ = load_base_model(str(tiny_base))
    half, _ = load_base_model(str(tiny_base), dtype=torch.float16, device="cpu")
    linears = [m for m in half.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is HalfWeightLinear for m in linears)
    assert half.get_input_embeddings().weight.dtype == torch.float32 and weight_dtype(half) == torch.float16
    assert torch.equal(half.get_input_embeddings().weight, exact.get_input_embeddings().weight)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        reference, ours = exact(ids).logits, half(ids).logits
    assert ours.dtype == torch.float32 and not torch.equal(ours, reference)  # the weights are rounded ...
    assert (ours - reference).abs().max() < 1e-2 * reference.abs().max()  # ... to fp16's 11 bits, no further


def test_the_auto_dtype_probes_one_row_and_a_batch_once_per_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_dtype_candidates", lambda: ("fp32", "bf16", "fp16"))
    timings = {(torch.float32, 1): 0.010, (torch.float32, 16): 0.030, (torch.bfloat16, 1): 0.005,
               (torch.bfloat16, 16): 0.040, (torch.float16, 1): 0.006, (torch.float16, 16): 0.020}  # fmt: skip
    calls = []
    monkeypatch.setattr(hardware, "_probe", lambda dtype, rows: calls.append((dtype, rows)) or timings[dtype, rows])
    verdict = hardware.cpu_dtype_verdict()
    assert verdict["fastest"] == "fp16" and verdict["bf16_ms_1_rows"] == 5.0  # 26 ms against 40 and 45
    assert len(calls) == 6 and hardware.cpu_dtype_verdict() == verdict and len(calls) == 6  # remembered
    stored = json.loads((tmp_path / "cpu_dtype_probe.json").read_text())
    assert list(stored.values()) == [verdict]
    assert hardware.resolve_dtype("auto", torch.device("cpu")) == torch.float16
    timings[torch.float16, 16] = 0.050  # another CPU, where fp16 is slow: fp32 is fastest
    monkeypatch.setattr(hardware, "cpu_name", lambda: "another CPU")
    assert hardware.cpu_dtype_verdict()["fastest"] == "fp32"


@needs_fbgemm
def test_the_probe_runs_each_candidate_in_the_linears_a_model_would_have(monkeypatch):
    seen = []
    monkeypatch.setattr(hardware, "adapt_cpu_linears", lambda model, dtype: seen.append(
        (dtype, next(model.parameters()).dtype)) or cpu_kernels.adapt_cpu_linears(model, dtype))  # fmt: skip
    for dtype in (torch.float32, torch.float16):
        assert hardware._probe(dtype, rows=2, repeats=1) > 0
    assert seen == [(torch.float32, torch.float32), (torch.float16, torch.float32)]  # fp16: fp32 loaded, then packed
