"""The decode step through transformers' forward and through the lean step (`loramix.decode_step`), paired: one
decode loop alternates the two paths step by step (their outputs are the same), so both see the same moments of a
machine whose speed drifts. Prints the median milliseconds per path and batch.

    python scripts/lean_steps.py --dtype fp16 --batches 1,4,16 --steps 60
    python scripts/lean_steps.py --bundle B --device cuda --dtype bf16 --gpu   # scripts/gpu_check.sh

`--gpu` builds the lean step on a GPU too (loramix uses it on CPUs only until it is measured there), after the same
check against transformers' step; the check's verdict is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loramix.decode_step import LeanDecoder
from loramix.generation import MixtureModel
from loramix.hardware import cpu_name
from loramix.loadtest import DEFAULT_PROMPTS


def paired_steps(mixture: MixtureModel, batch: int, steps: int) -> dict[str, float]:
    """Median ms per decode step of each path, `steps` steps in all after the prompt's prefill (four experts at
    equal weights, the hidden states of layer 2 captured as hidden routing does)."""
    paths = {"transformers": None, "lean": mixture.decoder}
    ids = torch.tensor([mixture.tokenizer(DEFAULT_PROMPTS[0])["input_ids"]] * batch, device=mixture.device)
    mask = torch.ones_like(ids)
    weights = torch.full((batch, len(mixture.expert_names)), 1 / len(mixture.expert_names), device=mixture.device)
    logits, cache, _ = mixture.forward(ids, mask, mask.cumsum(-1) - 1, None, weights, "exact")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for step in range(steps):
        name = list(paths)[step % len(paths)]
        mixture.decoder = paths[name]
        last = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(last)], dim=1)
        start = time.perf_counter()
        logits, cache, _ = mixture.forward(last, mask, mask.sum(1, keepdim=True) - 1, cache, weights, "exact", (2,))
        times[name].append(1000 * (time.perf_counter() - start))
    mixture.decoder = paths["lean"]
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default=None, help="default: the shipped bundle")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gpu", action="store_true", help="build the lean step on a GPU as well")
    args = parser.parse_args()
    mixture = MixtureModel.from_bundle(args.bundle, device=args.device, dtype=args.dtype)
    if mixture.decoder is None and args.gpu:
        lean = LeanDecoder(mixture.model)
        equal = lean.check()
        print(f"lean step on {mixture.device}: {'equal to' if equal else 'DIFFERENT from'} transformers' step")
        mixture.decoder = lean if equal else None
    if mixture.decoder is None:
        raise SystemExit("This model has no lean step here (not Llama-shaped, or on a GPU without --gpu).")
    where = torch.cuda.get_device_name() if mixture.device.type == "cuda" else cpu_name()
    print(f"{where}, {args.dtype}, {args.steps} steps alternating, median ms per step\n")
    print("| batch | transformers | lean | speed-up |\n|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        median = paired_steps(mixture, batch, args.steps)
        speedup = median["transformers"] / median["lean"]
        print(f"| {batch} | {median['transformers']:.1f} | {median['lean']:.1f} | {speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
