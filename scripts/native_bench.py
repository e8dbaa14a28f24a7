"""loramix's native kernels side by side with torch's, on this CPU, in one process (BENCHMARKS.md, "Native
kernels"): prints markdown tables.

    python scripts/native_bench.py [--rounds 3] [--steps 40]

1. FBGEMM's fp16 product: torch's one-thread call against `loramix.native` on one and on all threads, a sweep of 150
   packed [1536, 576] weights (265 MB, beyond any cache, as a model's weights are) at 1, 4 and 16 rows.
2. The same product on all threads against fp32 products of the converted weight (prefill sizes).
3. Decode steps of the shipped bundle in fp16: the lean step's torch operators against the native step, one
   process, `--rounds` rounds of `--steps` steps each, alternating.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from loramix import native
from loramix.cpu_kernels import _upcast_linear
from loramix.generation import MixtureModel
from loramix.hardware import cpu_name
from loramix.loadtest import DEFAULT_PROMPTS


def _median_ms(action, repeats: int) -> float:
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def product_sweep(threads: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(1536, 576, generator=generator) for _ in range(150)]
    torch_packed = [torch.fbgemm_pack_gemm_matrix_fp16(weight) for weight in weights]
    ours = [native.PackedHalf(weight, None, threads, native.library()) for weight in weights]
    print(f"| rows | torch (1 thread) | loramix, 1 thread | loramix, {threads} threads |\n|---|---|---|---|")
    for rows in (1, 4, 16):
        x = torch.randn(rows, 576, generator=generator)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        one = _median_ms(functools.partial(_torch_sweep, torch_packed, x), 10)
        torch.set_num_threads(before)
        mine = [_median_ms(functools.partial(_sweep, ours, x, count), 10) for count in (1, threads)]
        print(f"| {rows} | {one:.1f} ms | {mine[0]:.1f} ms | {mine[1]:.1f} ms |", flush=True)


def _torch_sweep(packed_weights: list, x: torch.Tensor) -> None:
    for packed in packed_weights:
        torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, None)


def _sweep(layers: list, x: torch.Tensor, threads: int) -> None:
    for layer in layers:
        layer.threads = threads
        layer(x)


def _fp32_sweep(weights: list, x: torch.Tensor) -> None:
    for weight in weights:
        _upcast_linear(x, weight, None)


def against_fp32(threads: int) -> None:
    generator = torch.Generator().manual_seed(1)
    halves = [torch.randn(1536, 576, generator=generator).half() for _ in range(12)]
    ours = [native.PackedHalf(weight, None, threads, native.library()) for weight in halves]
    print(f"\n| rows | fp16 FBGEMM, {threads} threads | fp32 of the converted weight |\n|---|---|---|")
    for rows in (16, 64, 128, 512, 2048):
        x = torch.randn(rows, 576, generator=generator)
        fbgemm = _median_ms(functools.partial(_sweep, ours, x, threads), 5) / len(ours)
        fp32 = _median_ms(functools.partial(_fp32_sweep, halves, x), 5) / len(halves)
        print(f"| {rows} | {fbgemm:.2f} ms | {fp32:.2f} ms |", flush=True)


def decode_steps(rounds: int, steps: int) -> None:
    mixture = MixtureModel.from_bundle(None, device="cpu", dtype="fp16")
    decoder = mixture.decoder
    if decoder is None or decoder.native is None:
        raise SystemExit(f"The native step is not in use here: {native.status()}")
    paths = {"torch operators": None, "native kernels": decoder.native}
    print("\n| batch | " + " | ".join(paths) + " |\n|---|---|---|")
    for batch in (1, 16):
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, step in paths.items():
                decoder.native = step
                times[name].append(_decode(mixture, batch, steps))
        cells = [" / ".join(f"{ms:.1f}" for ms in times[name]) + " ms" for name in paths]
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)
    decoder.native = paths["native kernels"]


def _decode(mixture: MixtureModel, batch: int, steps: int) -> float:
    """Median ms per decode step after the first prompt's prefill (four experts at 0.25, layer 29 captured)."""
    ids = torch.tensor([mixture.tokenizer(DEFAULT_PROMPTS[0])["input_ids"]] * batch)
    mask = torch.ones_like(ids)
    weights = torch.full((batch, len(mixture.expert_names)), 1 / len(mixture.expert_names))
    logits, cache, _ = mixture.forward(ids, mask, mask.cumsum(-1) - 1, None, weights, "exact")
    times = []
    for _ in range(steps):
        last = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(last)], dim=1)
        start = time.perf_counter()
        logits, cache, _ = mixture.forward(last, mask, mask.sum(1, keepdim=True) - 1, cache, weights, "exact", (29,))
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if native.library() is None:
        raise SystemExit(f"loramix's native kernels are not available here: {native.status()}")
    threads = torch.get_num_threads()
    print(f"{cpu_name()}, torch {torch.__version__}, {threads} threads\n")
    product_sweep(threads)
    against_fp32(threads)
    decode_steps(args.rounds, args.steps)


if __name__ == "__main__":
    main()
