"""Prompt-level routing accuracy on the validation split: for each source of the routing signal (MiniLM on the
whole prompt, MiniLM on a window, the base model's hidden states at each layer), how often the most similar
centroid is the item's own task's expert. Nothing is generated, so it takes minutes; it picks which sources are
worth a generation sweep (`loramix eval --split validation`).

    python scripts/routing_accuracy.py --bundle bundles/smollm2-135m --items 100 --out results/routing_accuracy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from loramix.bundle import Bundle, resolve_bundle
from loramix.eval_configs import oracle_experts
from loramix.generation import MixtureModel, left_padded_positions
from loramix.hidden_router import masked_mean
from loramix.paths import data_dir
from loramix.router import parse_route
from loramix.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--items", type=int, default=100, help="validation items per task")
    parser.add_argument("--windows", default="32+16,64+16,128", help="MiniLM windows W[+P] to try")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bundle = Bundle.load(resolve_bundle(args.bundle))
    mixture = MixtureModel.from_bundle(args.bundle, embedder_dtype="fp32")
    tokenizer, names = mixture.tokenizer, mixture.expert_names
    own = oracle_experts(bundle)
    tasks = [t for t in TASKS if t in own]
    items = {t: TASKS[t].load(data_dir(None), "validation")[: args.items] for t in tasks}
    sources: dict[str, dict[str, list[int]]] = {}

    def record(source: str, task: str, sims: torch.Tensor) -> None:
        hits = (sims.argmax(dim=-1) == names.index(own[task])).long().tolist()
        sources.setdefault(source, {}).setdefault(task, []).extend(hits)

    for task in tasks:
        prompts = [e.prompt for e in items[task]]
        record("minilm: whole prompt", task, mixture.router.similarities(prompts).similarities)
        for window in args.windows.split(","):
            policy = parse_route(f"window:{window}/top1", names)
            texts = [tokenizer.decode(policy.routing_ids(tokenizer(p).input_ids, []), skip_special_tokens=True)
                     for p in prompts]  # fmt: skip
            record(f"minilm: window {window}", task, mixture.router.similarities(texts).similarities)
        if mixture.hidden_router is None:
            continue
        layers = range(1, mixture.hidden_router.n_layers + 1)
        for start in range(0, len(prompts), 8):
            batch = tokenizer(prompts[start : start + 8], return_tensors="pt", padding=True)
            positions = left_padded_positions(batch.attention_mask)  # as generation runs them
            mixture.set_weights(None)
            with torch.no_grad():
                states = mixture.model(
                    **batch, position_ids=positions, output_hidden_states=True, logits_to_keep=1
                ).hidden_states
            for layer in layers:
                pooled = masked_mean(states[layer].float(), batch.attention_mask)
                record(f"hidden: layer {layer}", task, mixture.hidden_router.similarities(layer, pooled))
    table = {
        source: {**{t: sum(h) / len(h) for t, h in by_task.items()},
                 "mean": sum(sum(h) / len(h) for h in by_task.values()) / len(by_task)}
        for source, by_task in sources.items()
    }  # fmt: skip
    print("| source | " + " | ".join(tasks) + " | mean |\n|" + "---|" * (len(tasks) + 2))
    for source, row in table.items():
        print(f"| {source} | " + " | ".join(f"{100 * row[t]:.0f}%" for t in [*tasks, "mean"]) + " |")
    if args.out:
        args.out.write_text(json.dumps({"items_per_task": args.items, "split": "validation", "top1": table}, indent=2))


if __name__ == "__main__":
    main()
