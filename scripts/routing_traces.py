"""Per-token routing weights of one answer under several routing policies, as a picture: one row per policy, the
experts' weights stacked over the answer's tokens (black ticks: re-routes). Shows whether a policy follows the
text (and where MiniLM's 256-piece limit freezes the paper's rule on a long SQuAD context).

    python scripts/routing_traces.py --task squad --pick longest --out results/routing_traces_squad.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loramix.generation import MixtureModel  # noqa: E402
from loramix.paths import data_dir  # noqa: E402
from loramix.tasks import get_task  # noqa: E402

COLOURS = ["#06b6d4", "#d946ef", "#22c55e", "#eab308", "#3b82f6", "#ef4444"]
POLICIES = "the paper:k=2:paper,prompt-level:prompt:prompt:top1,default:k=1:hidden,cheapest:k=1:hidden:2/top1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="squad")
    parser.add_argument("--split", default="test")
    parser.add_argument("--pick", default="longest", help="'longest' prompt, 'longest-answer', or an item index")
    parser.add_argument("--policies", default=POLICIES, help="comma-separated LABEL:K:ROUTE (K as in every_k)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    task = get_task(args.task)
    items = task.load(data_dir(None), args.split)
    picks = {"longest": lambda e: len(e.prompt), "longest-answer": lambda e: len(e.target)}
    item = max(items, key=picks[args.pick]) if args.pick in picks else items[int(args.pick)]
    mixture = MixtureModel.from_bundle(None)
    budget = args.max_new_tokens or task.max_new_tokens
    policies = []
    for spec in args.policies.split(","):
        label, k, route = spec.split(":", 2)
        every_k = int(k.removeprefix("k=")) if k.startswith("k=") else 1
        shown = f"{label}\n{route}" + ("" if k == "prompt" else f", k={every_k}")
        policies.append((shown, every_k, route))
    fig, axes = plt.subplots(len(policies), 1, figsize=(11, 1.6 * len(policies) + 0.8), sharex=True, squeeze=False)
    for ax, (label, every_k, route) in zip(axes[:, 0], policies):
        result = mixture.generate(item.prompt, route=route, every_k=every_k, max_new_tokens=budget, stop=task.stop)
        weights = result.weights.numpy()
        steps = range(len(weights))
        ax.stackplot(steps, weights.T, colors=COLOURS[: weights.shape[1]], step="post")
        for step in result.reroutes:
            ax.plot([step, step], [-0.06, -0.01], color="black", linewidth=0.6)
        ax.set_ylim(-0.07, 1)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_yticks([])
        shown = label.replace(chr(10), " ")
        print(f"{shown}: {result.text[:120]!r} ({len(weights)} tokens, {result.frozen_reroutes} frozen re-routes)")
    axes[-1, 0].set_xlabel("generated token")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[i]) for i in range(len(mixture.expert_names))]
    fig.legend(handles, mixture.expert_names, loc="upper center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, 0.96))  # fmt: skip
    fig.suptitle(f"{task.title} {item.id}: per-token routing weights", y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(args.out, dpi=110)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
