"""Placement's CPU side: bf16 Linears on a CPU without bf16 instructions take the bf16 kernel for a few rows and
fp32 products of the same stored weights for more; the auto dtype comes from a probe of both row counts."""

from __future__ import annotations

import json

import pytest
import torch

from loramix import hardware
from loramix.hardware import BF16_KERNEL_MAX_ROWS, UPCAST_CHUNK, RowAdaptiveLinear, adapt_bf16_linears


def _bf16_model(out_features: int = 48) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, out_features), torch.nn.ReLU(), torch.nn.Linear(out_features, 8))


def test_few_rows_take_the_bf16_kernel_and_many_rows_fp32_products_of_the_same_weights(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
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
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    model = _bf16_model().to(dtype)
    assert adapt_bf16_linears(model) == adapted
    assert sum(type(m) is RowAdaptiveLinear for m in model.modules()) == adapted


def test_the_auto_dtype_probes_one_row_and_a_batch_once_per_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path))
    timings = {(torch.float32, 1): 0.010, (torch.float32, 16): 0.030, (torch.bfloat16, 1): 0.005,
               (torch.bfloat16, 16): 0.040}  # fmt: skip
    calls = []
    monkeypatch.setattr(hardware, "_probe", lambda dtype, rows: calls.append((dtype, rows)) or timings[dtype, rows])
    verdict = hardware.cpu_bf16_verdict()
    assert verdict["bf16_faster"] is False and verdict["bf16_ms_1_rows"] == 5.0  # 45 ms against 40 ms in all
    assert len(calls) == 4 and hardware.cpu_bf16_verdict() == verdict and len(calls) == 4  # remembered
    stored = json.loads((tmp_path / "cpu_bf16_probe.json").read_text())
    assert list(stored.values()) == [verdict]
