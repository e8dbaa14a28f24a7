"""How long each task's test prompts are for the router's embedder, and how many already fill its input.

A prompt that fills the embedder's input (256 word pieces for MiniLM, special tokens included) freezes routing
from the first token: nothing generated can change the weights. Writes OUT/prompt_lengths.json.

    python scripts/prompt_lengths.py --out results/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from loramix.bundle import Bundle, resolve_bundle
from loramix.paths import data_dir
from loramix.router import Embedder
from loramix.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    bundle = Bundle.load(resolve_bundle(args.bundle))
    embedder = Embedder(bundle.embedder)
    tokenizer = embedder.model.tokenizer
    room = embedder.max_length - tokenizer.num_special_tokens_to_add()
    report = {"embedder": bundle.embedder, "input_limit": embedder.max_length, "split": args.split, "tasks": {}}
    for name, task in TASKS.items():
        prompts = [e.prompt for e in task.load(data_dir(args.data_dir), args.split)]
        pieces = np.array([len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids])
        report["tasks"][name] = {
            "prompts": len(prompts),
            "median_pieces": float(np.median(pieces)),
            "p90_pieces": float(np.percentile(pieces, 90)),
            "max_pieces": int(pieces.max()),
            "share_filling_input": round(float((pieces >= room).mean()), 4),
        }
        print(name, report["tasks"][name])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompt_lengths.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
