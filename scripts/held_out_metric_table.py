"""The held-out metric table: mean BBH exact match / HumanEval pass@1 (x100) over the 21 held-out tasks, each
config minus base, uniform, the best expert in hindsight (per task, on the same items: an optimistic bound) and the
expert each task's validation half chose by loss (a fair single-expert policy), with paired bootstrap 95% CIs
(every task resampled on its own, 2,000 draws). Reads results/held-out-metric/items.jsonl and
results/held-out-validation/answer_loss.jsonl.

    python scripts/held_out_metric_table.py
"""

import collections
import json
import random
import statistics

rows = [json.loads(line) for line in open("results/held-out-metric/items.jsonl")]
score = collections.defaultdict(dict)
for r in rows:
    score[r["config"]][(r["task"], r["id"])] = list(r["scores"].values())[0]
configs = list(score)
items = sorted(set.intersection(*[set(v) for v in score.values()]))
tasks = sorted({t for t, _ in items})
by_task = {t: [i for i in items if i[0] == t] for t in tasks}
experts = [c for c in configs if c.startswith("expert:")]
val = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open("results/held-out-validation/answer_loss.jsonl"):
    r = json.loads(line)
    if r["model"] in ("gsm8k", "arc", "squad", "codealpaca"):
        val[r["task"]]["expert:" + r["model"]].append(r["nll"])
chosen = {t: min(val[t], key=lambda e: statistics.mean(val[t][e])) for t in val}
best = {t: max(experts, key=lambda e: statistics.mean(score[e][i] for i in by_task[t])) for t in tasks}


def value(cfg, t, sample):
    if cfg == "expert chosen on validation loss":
        return statistics.mean(score[chosen[t]][i] for i in sample)
    if cfg == "best expert (hindsight)":
        return statistics.mean(score[best[t]][i] for i in sample)
    return statistics.mean(score[cfg][i] for i in sample)


def avg(cfg, samples):
    return 100 * statistics.mean(value(cfg, t, samples[t]) for t in tasks)


rng = random.Random(0)
boots = [{t: [rng.choice(by_task[t]) for _ in by_task[t]] for t in tasks} for _ in range(2000)]
full = {t: by_task[t] for t in tasks}
rows_out = configs + ["best expert (hindsight)", "expert chosen on validation loss"]
refs = ["base", "uniform", "best expert (hindsight)", "expert chosen on validation loss"]
print(f"{len(items)} items, {len(tasks)} tasks")
header = ["config", "mean x100"] + [f"minus {ref}" for ref in refs]
print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
for c in rows_out:
    cells = []
    point = avg(c, full)
    bs = sorted(avg(c, b) for b in boots)
    cells.append(f"{point:.1f} [{bs[50]:.1f}, {bs[1949]:.1f}]")
    for r in refs:
        if r == c:
            cells.append("")
            continue
        d = point - avg(r, full)
        ds = sorted(avg(c, b) - avg(r, b) for b in boots)
        lo, hi = ds[50], ds[1949]
        txt = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        cells.append(f"**{txt}**" if lo > 0 or hi < 0 else txt)
    print(f"| {c} | " + " | ".join(cells) + " |")
print(
    "best expert per task:",
    collections.Counter(best.values()),
    "chosen on validation:",
    collections.Counter(chosen.values()),
)
off = [t for t in tasks if max(statistics.mean(score[c][i] for i in by_task[t]) for c in configs) > 0]
print("tasks off the floor (some config > 0):", len(off))
