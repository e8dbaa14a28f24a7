"""Linear layers for half-precision weights on a CPU, where torch's own half-precision products are slow.

A decode step reads every weight once per token, so its speed is the bytes of the weights over the memory's
bandwidth: half-precision weights halve the step, if the product keeps up with the memory. torch's does not
everywhere (BENCHMARKS.md, "Half-precision weights on a CPU"), hence two layers:

- bf16, on a CPU without bf16 instructions: `RowAdaptiveLinear`. torch's bf16 product is fast for a few rows
  (3.4x fp32 at one row) and slower than fp32 from ~8 rows on, up to 7x at prefill sizes; there the stored bf16
  weight is converted to fp32, 2,048 output rows at a time (so the fp32 copy stays in cache), and multiplied in fp32.
- fp16 weights, on an x86 CPU with FBGEMM (AVX2): `HalfWeightLinear`. The weight is stored in fp16 and packed for
  FBGEMM's fp16 product, which takes fp32 activations and accumulates in fp32: only the weights are rounded, to 11
  significant bits (bf16 keeps 8), and the model around them (embeddings, norms, attention, the experts' LoRA
  matrices, the KV cache) stays fp32. torch runs FBGEMM's product on one thread; `loramix.native` runs it on all
  of torch's threads: faster than fp32 up to ~128 rows, on a par from 512. Without that library, from
  HALF_KERNEL_MAX_ROWS rows on (prefill) the fp16 weight is converted to fp32 in chunks and multiplied on all threads
  instead.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from loramix import native

BF16_KERNEL_MAX_ROWS = 4
HALF_KERNEL_MAX_ROWS = 32  # torch's 1-thread FBGEMM vs 2-thread fp32: 0.31 vs 0.52 ms at 16 rows, 1.27 vs 0.98 at 64
UPCAST_CHUNK = 2048

# torch marks FBGEMM's fp16 ops deprecated (torch.ao's successor, torchao, has no CPU fp16 kernel); torch is pinned.
warnings.filterwarnings("ignore", message=r"fbgemm_.*is deprecated")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def fbgemm_fp16_available() -> bool:
    """Whether this torch build and CPU have FBGEMM's fp16-weight product (x86 with AVX2)."""
    try:
        packed = torch.fbgemm_pack_gemm_matrix_fp16(torch.ones(8, 8))
        return bool(torch.fbgemm_linear_fp16_weight_fp32_activation(torch.ones(1, 8), packed, None)[0, 0] == 8)
    except (RuntimeError, AttributeError):
        return False


def stores_half_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model placed so keeps fp32 activations around fp16 weights (`HalfWeightLinear`)."""
    return torch.device(device).type == "cpu" and dtype == torch.float16 and fbgemm_fp16_available()


def load_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model placed so is loaded in before `adapt_cpu_linears`: fp32 where its Linears then become fp16
    `HalfWeightLinear`s, else `dtype` itself."""
    return torch.float32 if stores_half_weights(device, dtype) else dtype


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 products of a half-precision weight, converted UPCAST_CHUNK output rows at a time."""
    wide = x.float()
    parts = [
        torch.nn.functional.linear(
            wide, weight[start : start + UPCAST_CHUNK].float(),
            None if bias is None else bias[start : start + UPCAST_CHUNK].float(),
        )
        for start in range(0, weight.shape[0], UPCAST_CHUNK)
    ]  # fmt: skip
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class RowAdaptiveLinear(torch.nn.Linear):
    """A bf16 Linear for CPUs without bf16 instructions: up to BF16_KERNEL_MAX_ROWS rows through the bf16 kernel,
    more rows in fp32 from the same stored bf16 weight (the output is bf16 either way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= BF16_KERNEL_MAX_ROWS * x.shape[-1]:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return _upcast_linear(x, self.weight, self.bias).to(x.dtype)


class HalfWeightLinear(torch.nn.Linear):
    """An fp16 weight (and fp32 bias) applied to fp32 activations through FBGEMM's packed product. The fp16 weight
    stays a parameter (state dicts, PEFT and `.weight` readers see it); the packed copy is FBGEMM's, rebuilt from
    it. Where `loramix.native` is built the product runs on all of torch's threads and takes any number of rows
    (faster than fp32 up to ~128 rows, on a par from 512); else on torch's one thread, for up to
    HALF_KERNEL_MAX_ROWS rows, and more rows go through fp32 products of the converted weight."""

    kernel: Callable[[torch.Tensor], torch.Tensor]  # fp32 x -> x W^T + b through FBGEMM
    kernel_max_rows: float  # most rows `kernel` is the faster product for

    def pack(self) -> None:
        packed = native.pack(self.weight, self.bias)
        self.kernel = packed or self._torch_kernel(torch.fbgemm_pack_gemm_matrix_fp16(self.weight.detach().float()))
        self.kernel_max_rows = float("inf") if packed else HALF_KERNEL_MAX_ROWS

    def _torch_kernel(self, packed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.kernel_max_rows * x.shape[-1]:
            return self.kernel(x.float())
        return _upcast_linear(x, self.weight, self.bias)


def _plain_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [module for module in model.modules() if type(module) is torch.nn.Linear]


def adapt_bf16_linears(model: torch.nn.Module) -> int:
    """A bf16 model on a CPU without bf16 instructions: its Linears become `RowAdaptiveLinear` (same weights, same
    state dict). Returns how many; 0 where nothing is to gain (fp32, a GPU, a CPU with bf16 instructions)."""
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.bfloat16 or cpu_has_native_bf16():
        return 0
    linears = _plain_linears(model)
    for module in linears:
        module.__class__ = RowAdaptiveLinear
    return len(linears)


def pack_fp16_linears(model: torch.nn.Module) -> int:
    """An fp32 model on a CPU: its Linears become `HalfWeightLinear`, their weights rounded to fp16 (a weight tied
    to an embedding is untied: the embedding keeps fp32). Returns how many."""
    linears = _plain_linears(model)
    for module in linears:
        weight = module.weight.detach().to(torch.float16)
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        module.__class__ = HalfWeightLinear
        module.pack()
    return len(linears)


def adapt_cpu_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """The Linears of a model loaded for `dtype` (fp32 weights when it `stores_half_weights`), adapted to this
    CPU's fast products; a no-op elsewhere. Returns how many were adapted."""
    device = next(model.parameters()).device
    return pack_fp16_linears(model) if stores_half_weights(device, dtype) else adapt_bf16_linears(model)


def weight_dtype(model: torch.nn.Module) -> torch.dtype:
    """The precision a model's weights are stored in: fp16 for one with `HalfWeightLinear`s (its parameters'
    first dtype, the embeddings', is the arithmetic's: fp32)."""
    if any(isinstance(module, HalfWeightLinear) for module in model.modules()):
        return torch.float16
    return next(model.parameters()).dtype
