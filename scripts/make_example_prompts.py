"""Writes src/loramix/examples/prompts.jsonl: the first held-out test item of each task, with its source and
license, so `loramix demo` runs from a bare clone or an installed wheel, with no data folder.

    python scripts/make_example_prompts.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loramix.paths import data_dir
from loramix.tasks import TASKS

SOURCES = {
    "gsm8k": ("openai/grade-school-math, test.jsonl", "MIT (c) 2021 OpenAI"),
    "arc": ("AI2 ARC-V1-Feb2018, ARC-Challenge-Test.jsonl", "CC BY-SA 4.0 (AI2)"),
    "squad": ("SQuAD v1.1 dev-v1.1.json (loramix's held-out articles)", "CC BY-SA 4.0 (SQuAD)"),
    "codealpaca": ("sahil2801/CodeAlpaca code_alpaca_2k.json (loramix's held-out 10%)", "CC BY-NC 4.0 (CodeAlpaca)"),
}
OUT = Path(__file__).resolve().parent.parent / "src" / "loramix" / "examples" / "prompts.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    lines = []
    for name, task in TASKS.items():
        example = task.load(data_dir(args.data_dir), "test")[0]
        source, license_name = SOURCES[name]
        lines.append(json.dumps({"task": name, "id": example.id, "prompt": example.prompt, "target": example.target,
                                 "source": source, "license": license_name}, ensure_ascii=False))  # fmt: skip
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written {OUT} ({len(lines)} prompts)")


if __name__ == "__main__":
    main()
