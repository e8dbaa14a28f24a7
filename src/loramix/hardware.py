"""Where a model runs and in which precision: `--device` and `--dtype` of every command that loads a model.

    auto device: the first CUDA GPU, else Apple's MPS, else the CPU.
    auto dtype : on a GPU, bf16 (fp16 where the GPU has no bf16); on MPS fp16; on a CPU, the fastest of fp32, bf16
                 and fp16 on this very CPU (a short probe of decode-sized matrix products, remembered per CPU model
                 and torch version).

fp32 is the exactness reference; bf16 and fp16 trade the last bits of the logits for speed and memory (the tests
state the agreement they hold: docs/generation.md). On a CPU, fp16 means fp16 weights and fp32 arithmetic where
FBGEMM is there (`loramix.cpu_kernels`), and half-precision Linears take this CPU's fast products.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass

import torch

from loramix import native
from loramix.cpu_kernels import adapt_cpu_linears, fbgemm_fp16_available, load_dtype
from loramix.errors import OptionError
from loramix.options import option

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {value: key for key, value in DTYPES.items()}


@dataclass(frozen=True)
class Placement:
    """Where the model runs; a field group of every command that loads a model."""

    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps (auto: a GPU when there is one).")
    dtype: str = option("auto", "auto, fp32, bf16 or fp16 (auto: bf16 on GPUs; on a CPU the fastest there).")

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
    return DTYPES[cpu_dtype_verdict()["fastest"]]


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


def cpu_dtype_candidates() -> tuple[str, ...]:
    """The precisions `auto` chooses among on this CPU: fp16 only where its weights can be FBGEMM's."""
    return ("fp32", "bf16", "fp16") if fbgemm_fp16_available() else ("fp32", "bf16")


def _probe(dtype: torch.dtype, rows: int, repeats: int = 5) -> float:
    """Median seconds of a decode-sized step: `rows` rows through four 1024 x 4096 / 4096 x 1024 pairs (64 MB in
    bf16, beyond a cache, as a model's weights are), in the Linears a model of this dtype would have here."""
    generator = torch.Generator().manual_seed(0)
    stored = load_dtype(torch.device("cpu"), dtype)
    layers = []
    for shape in [(4096, 1024), (1024, 4096)] * 4:
        layer = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=stored)
        torch.nn.init.normal_(layer.weight, generator=generator)
        layers.append(layer)
    adapt_cpu_linears(torch.nn.Sequential(*layers), dtype)
    x = torch.randn(rows, 1024, generator=generator).to(stored)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for layer in layers:
                x = layer(x)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def cpu_dtype_verdict() -> dict:
    """The fastest of `cpu_dtype_candidates()` on this CPU over a one-row and a 16-row step together (without bf16
    instructions bf16 wins the first and loses the second): probed once, remembered per CPU and torch."""
    from loramix.paths import loramix_home

    candidates = cpu_dtype_candidates()
    key = (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | rows {PROBE_ROWS} | "
           f"{','.join(candidates)} | fp16 on {'all threads' if native.library() else 'one thread'}")  # fmt: skip
    path = loramix_home() / "cpu_dtype_probe.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        verdict = {}
        for name in candidates:
            for rows in PROBE_ROWS:
                verdict[f"{name}_ms_{rows}_rows"] = round(1000 * _probe(DTYPES[name], rows), 3)
        total = {name: sum(verdict[f"{name}_ms_{rows}_rows"] for rows in PROBE_ROWS) for name in candidates}
        known[key] = {**verdict, "fastest": min(candidates, key=total.__getitem__)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=2), encoding="utf-8")
        except OSError:
            pass  # a read-only cache: probe again next time
    return known[key]


def describe(device: torch.device, dtype: torch.dtype) -> dict:
    """What results record about where they were computed."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = cpu_name() if device.type == "cpu" else device.type
    return {"device": str(device), "dtype": DTYPE_NAMES.get(dtype, str(dtype)), "hardware": where}
