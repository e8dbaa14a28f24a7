"""loramix's native CPU kernels: a small C++ library (`csrc/native.cpp`) built once per torch version into the
loramix home against the FBGEMM inside torch's own library, and loaded with ctypes.

- FBGEMM's fp16-weight product on every thread torch uses (`PackedHalf`). torch calls it on one thread. A decode
  step's products are bound by how fast the weights stream from memory, and on a small CPU one core reads them at
  about half the machine's rate: two processes streaming weights at once each kept one's speed (BENCHMARKS.md,
  "Native kernels"). FBGEMM splits a product's output columns over threads (its `thread_id` of `num_threads`),
  each column through the same kernel in the same order as on one thread: the products are torch's bit for bit.
- The small operators of a Llama decode step, one call each (`add_rms`, `rope`, `silu_mul`, `lora`, `attend`), for
  `loramix.native_step`.

Where the library cannot be built or its product does not match torch's on a probe (no C++ compiler, a CPU
without AVX2, `LORAMIX_NATIVE=0`), `library()` is None and callers keep torch's operators.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch

from loramix.paths import PACKAGE_ROOT, loramix_home

SOURCE = PACKAGE_ROOT / "csrc" / "native.cpp"
STUB_HEADERS = PACKAGE_ROOT / "csrc" / "stub"  # asmjit's, which FBGEMM's headers include and torch does not ship
BUILD_SECONDS = 180
# AVX2 and FMA, as FBGEMM's fp16 product needs; no contraction of a product and a sum into one rounding (torch's
# elementwise operators round each)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).resolve().parent
    return root / "include", root / "lib"


def _build_key() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    for header in sorted(STUB_HEADERS.rglob("*.h")):
        digest.update(header.read_bytes())
    digest.update(f"{torch.__version__} {platform.machine()} {FLAGS}".encode())
    return digest.hexdigest()[:16]


def _build(target: Path) -> str | None:
    """Compile the library to `target` (written whole or not at all, so concurrent builds cannot half-write it);
    None, or why it could not be built."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    include, lib = _torch_dirs()
    if compiler is None:
        return f"no C++ compiler ('{os.environ.get('CXX', 'g++')}' not found; install g++ or set CXX)"
    if not (include / "fbgemm" / "FbgemmFP16.h").is_file():
        return "this torch ships no FBGEMM headers"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return _compile(compiler, include, lib, target)
    except OSError as exc:  # a read-only cache, a full disk
        return f"could not be written to {target.parent}: {exc}"


def _compile(compiler: str, include: Path, lib: Path, target: Path) -> str | None:
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [
            compiler, *FLAGS, f"-I{STUB_HEADERS}", f"-I{include}",
            str(SOURCE), "-o", str(built), f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
        ]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=BUILD_SECONDS)
        except subprocess.CalledProcessError as exc:
            return f"the build failed: {(exc.stderr or '').strip().splitlines()[-1:] or exc}"
        except subprocess.SubprocessError as exc:
            return f"the build failed: {exc}"
        os.replace(built, target)
    return None


def _declare(compiled: ctypes.CDLL) -> ctypes.CDLL:
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    compiled.loramix_half_pack.restype, compiled.loramix_half_pack.argtypes = pointer, [integer, integer, pointer]
    compiled.loramix_half_free.restype, compiled.loramix_half_free.argtypes = None, [pointer]
    compiled.loramix_half_gemm.restype = None
    compiled.loramix_half_gemm.argtypes = [integer, pointer, pointer, pointer, pointer, integer]
    real, whole = ctypes.c_float, ctypes.c_long
    declared = {
        "loramix_add_rms": [integer, integer, pointer, pointer, pointer, real, pointer, pointer],
        "loramix_rope": [integer, integer, integer, pointer, pointer, pointer],
        "loramix_silu_mul": [whole, pointer, pointer, integer],
        "loramix_lora": [integer] * 4 + [pointer] * 5 + [integer],
        "loramix_attend": [integer] * 6 + [real] + [pointer] * 3 + [whole] * 2 + [pointer] * 2 + [integer],
        "loramix_append": [integer] * 3 + [whole] * 2 + [integer] + [pointer] * 2,
    }
    for name, argtypes in declared.items():
        function = getattr(compiled, name)
        function.restype, function.argtypes = None, argtypes
    return compiled


def _matches_torch(compiled: ctypes.CDLL) -> bool:
    """The library's product of a random layer on several threads, against torch's: equal to the last bit?"""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(200, 72, generator=generator), torch.randn(200, generator=generator)
    x = torch.randn(3, 72, generator=generator)
    layer = PackedHalf(weight, bias, threads=2, compiled=compiled)
    expected = torch.fbgemm_linear_fp16_weight_fp32_activation(x, torch.fbgemm_pack_gemm_matrix_fp16(weight), bias)
    return torch.equal(layer(x), expected)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library (built on first use) and what `loramix info` says of it; None and why where there is none."""
    if os.environ.get("LORAMIX_NATIVE", "1") == "0":
        return None, "off (LORAMIX_NATIVE=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"not built for {platform.machine()} (x86 with AVX2 only)"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):  # built for AVX2 and FMA
        return None, "this CPU has no AVX2"
    target = loramix_home() / "native" / f"native-{_build_key()}.so"
    if not target.is_file() and (why := _build(target)):
        return None, why
    try:
        compiled = _declare(ctypes.CDLL(str(target)))
        if not _matches_torch(compiled):
            return None, "its fp16 product differed from torch's here: not used"
    except (OSError, RuntimeError, AttributeError) as exc:
        return None, f"could not be loaded: {exc}"
    return (
        compiled,
        f"in use (FBGEMM's fp16 product on {torch.get_num_threads()} threads, the fp16 decode step): {target}",
    )


def library() -> ctypes.CDLL | None:
    """The compiled library; None where it cannot be built or does not match torch's product (`status` says why)."""
    return _load()[0]


def status() -> str:
    return _load()[1]


class PackedHalf:
    """x [..., k] -> x W^T + b with W [n, k] stored as FBGEMM's packed fp16, computed on `threads` threads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threads: int, compiled: ctypes.CDLL):
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.threads, self._library = threads, compiled
        source = weight.detach().float().contiguous()
        self.handle = compiled.loramix_half_pack(self.in_features, self.out_features, source.data_ptr())
        if not self.handle:
            raise RuntimeError("FBGEMM could not pack this weight.")
        weakref.finalize(self, compiled.loramix_half_free, self.handle)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.numel() // self.in_features
        out = torch.empty(*x.shape[:-1], self.out_features)
        bias, library = _address(self.bias), self._library
        library.loramix_half_gemm(rows, x.data_ptr(), self.handle, bias, out.data_ptr(), self.threads)
        return out

    def __deepcopy__(self, memo) -> PackedHalf:
        raise TypeError("A packed fp16 weight is not copied; copy the model before its Linears are packed.")


def pack(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedHalf | None:
    """`weight` packed for the native library's product on torch's thread count, or None where there is none."""
    compiled = library()
    return None if compiled is None else PackedHalf(weight, bias, torch.get_num_threads(), compiled)


# ---- the small operators of a decode step (fp32, contiguous; see csrc/native.cpp) ----


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def add_rms(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(h + delta, rms_norm(h + delta) * weight) for h [rows, d]; without delta, (a copy of h, its norm)."""
    summed, normed = torch.empty_like(h), torch.empty_like(h)
    rows, width = h.shape
    library().loramix_add_rms(
        rows, width, h.data_ptr(), _address(delta), weight.data_ptr(), eps, summed.data_ptr(), normed.data_ptr()
    )
    return summed, normed


def rope(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads * dim] rotated in place at each row's cos and sin [rows, dim]."""
    library().loramix_rope(x.shape[0], heads, cos.shape[-1], x.data_ptr(), cos.data_ptr(), sin.data_ptr())
    return x


def silu_mul(gate: torch.Tensor, up: torch.Tensor, threads: int) -> torch.Tensor:
    """silu(gate) * up, into gate."""
    library().loramix_silu_mul(gate.numel(), gate.data_ptr(), up.data_ptr(), threads)
    return gate


def lora(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, b_t: torch.Tensor, y: torch.Tensor, threads: int):
    """y [rows, out] += ((x A^T) * scale) B: the experts' exact mixture (A [rank, in], b_t = B^T [rank, out])."""
    rows, width = x.shape
    assert scale.is_contiguous() and x.is_contiguous(), "the native mixture reads its operands contiguous"
    library().loramix_lora(
        rows, width, a.shape[0], b_t.shape[1], x.data_ptr(), a.data_ptr(), scale.data_ptr(), b_t.data_ptr(),
        y.data_ptr(), threads,
    )  # fmt: skip
    return y


def attend(q, keys, values, mask: torch.Tensor | None, scaling: float, heads: int, threads: int) -> torch.Tensor:
    """Attention of the last T positions of each row, causal: q [rows * T, heads * dim], keys and values [rows,
    kv_heads, length, dim] (each position's dim values contiguous, rows and heads at any equal strides), mask
    [rows, length] uint8 (None: every key) -> [rows * T, heads * dim]."""
    rows, kv_heads, length, dim = keys.shape
    if keys.stride()[2:] != (dim, 1) or keys.stride() != values.stride():
        keys, values = keys.contiguous(), values.contiguous()
    out = torch.empty_like(q)
    library().loramix_attend(
        rows, q.shape[0] // rows, heads, kv_heads, length, dim, scaling, q.data_ptr(), keys.data_ptr(),
        values.data_ptr(), keys.stride(0), keys.stride(1), _address(mask), out.data_ptr(), threads,
    )  # fmt: skip
    return out


def append(room: torch.Tensor, at: int, fresh: torch.Tensor) -> None:
    """room [rows, heads, capacity, dim] at position `at` <- fresh [rows, heads, 1, dim] (contiguous)."""
    rows, heads, _, dim = room.shape
    library().loramix_append(rows, heads, dim, room.stride(0), room.stride(1), at, fresh.data_ptr(), room.data_ptr())
