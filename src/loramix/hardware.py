"""Where a model runs and in which precision: `--device` and `--dtype` of every command that loads a model.

    auto device: the first CUDA GPU, else Apple's MPS, else the CPU.
    auto dtype : on a GPU, bf16 (fp16 where the GPU has no bf16); on MPS fp16; on a CPU, bf16 only where it
                 measures faster than fp32 on this very CPU (a short probe of decode-sized matrix products,
                 remembered per CPU model and torch version), else fp32.

fp32 is the exactness reference; bf16 and fp16 trade the last bits of the logits for speed and memory (the tests
state the agreement they hold: docs/generation.md).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass

import torch

from loramix.errors import OptionError
from loramix.options import option

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {value: key for key, value in DTYPES.items()}


@dataclass(frozen=True)
class Placement:
    """Where the model runs; a field group of every command that loads a model."""

    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps (auto: a GPU when there is one).")
    dtype: str = option("auto", "auto, fp32, bf16 or fp16 (auto: bf16 on GPUs; on a CPU where it measures faster).")

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionError("device", f"must be auto, cpu, cuda, cuda:N or mps, got '{name}'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", f"is '{name}', but this machine (this torch build) has no CUDA GPU.")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise OptionError("device", f"is '{name}', but there are {torch.cuda.device_count()} GPU(s).")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError("device", "is 'mps', but MPS is not available here.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise OptionError("device", f"must be auto, cpu, cuda, cuda:N or mps, got '{name}'.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise OptionError("dtype", f"must be auto, fp32, bf16 or fp16, got '{name}'.")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_bf16_verdict()["bf16_faster"] else torch.float32


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PROBE_ROWS = (1, 16)  # one stream's decode step, and a batch's


def _probe(dtype: torch.dtype, rows: int, repeats: int = 5) -> float:
    """Median seconds of a decode-sized step: `rows` rows through four 1024 x 4096 / 4096 x 1024 pairs (64 MB in
    bf16, beyond a cache, as a model's weights are), in the kernels a model of this dtype would use here."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for shape in [(4096, 1024), (1024, 4096)] * 4:
        layer = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
        torch.nn.init.normal_(layer.weight, generator=generator)
        layers.append(layer)
    adapt_bf16_linears(torch.nn.Sequential(*layers))
    x = torch.randn(rows, 1024, generator=generator).to(dtype)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for layer in layers:
                x = layer(x)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def cpu_bf16_verdict() -> dict:
    """Whether bf16 is faster than fp32 on this CPU, over a one-row and a 16-row step together (on CPUs without
    bf16 instructions bf16 wins the first and loses the second): probed once, remembered per CPU and torch."""
    from loramix.paths import loramix_home

    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | rows {PROBE_ROWS}"
    path = loramix_home() / "cpu_bf16_probe.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        verdict = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for rows in PROBE_ROWS:
                verdict[f"{name}_ms_{rows}_rows"] = round(1000 * _probe(dtype, rows), 3)
        total = {name: sum(verdict[f"{name}_ms_{rows}_rows"] for rows in PROBE_ROWS) for name in ("fp32", "bf16")}
        known[key] = {**verdict, "bf16_faster": total["bf16"] < total["fp32"]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=2), encoding="utf-8")
        except OSError:
            pass  # a read-only cache: probe again next time
    return known[key]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# On a CPU without bf16 instructions, torch's bf16 matrix product is fast only for a few rows, where reading half
# the bytes of fp32 is what counts (a decode step: 3.4x fp32's speed at 1 row); from ~8 rows on it is slower than
# fp32, up to 7x at prefill sizes. There, converting the stored bf16 weight to fp32 and multiplying in fp32 is as
# fast as fp32 weights, or faster (BENCHMARKS.md, "bf16 side by side, and where a step's time goes").
# The weight is converted 2,048 output rows at a time, so the fp32 copy stays in cache (converting a vocabulary-
# sized head at once costs more than the product itself).
BF16_KERNEL_MAX_ROWS = 4
UPCAST_CHUNK = 2048


class RowAdaptiveLinear(torch.nn.Linear):
    """A bf16 Linear for CPUs without bf16 instructions: up to BF16_KERNEL_MAX_ROWS rows through the bf16 kernel,
    more rows in fp32 from the same stored bf16 weight (the output is bf16 either way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= BF16_KERNEL_MAX_ROWS * x.shape[-1]:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        wide = x.float()
        parts = [
            torch.nn.functional.linear(
                wide, self.weight[start : start + UPCAST_CHUNK].float(),
                None if self.bias is None else self.bias[start : start + UPCAST_CHUNK].float(),
            ).to(x.dtype)
            for start in range(0, self.out_features, UPCAST_CHUNK)
        ]  # fmt: skip
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def adapt_bf16_linears(model: torch.nn.Module) -> int:
    """A bf16 model on a CPU without bf16 instructions: its Linears become `RowAdaptiveLinear` (same weights, same
    state dict). Returns how many; 0 where nothing is to gain (fp32, a GPU, a CPU with bf16 instructions)."""
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.bfloat16 or cpu_has_native_bf16():
        return 0
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for module in linears:
        module.__class__ = RowAdaptiveLinear
    return len(linears)


def describe(device: torch.device, dtype: torch.dtype) -> dict:
    """What results record about where they were computed."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = cpu_name() if device.type == "cpu" else device.type
    return {"device": str(device), "dtype": DTYPE_NAMES.get(dtype, str(dtype)), "hardware": where}
