#!/usr/bin/env bash
# Gold-answer loss (teacher forcing, routing recomputed at every gold token as generation would) for every config
# the routing study compares, on the held-out tasks' test halves (BBH's 20 tasks and HumanEval) and on the four
# trained tasks' test items. Resumable: items already in answer_loss.jsonl are skipped. Then the reports.
# LIMIT_HELD_OUT / LIMIT_TRAINED: items per task (the first N of each task's test half / test split).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_HELD_OUT=${LIMIT_HELD_OUT:-15}
LIMIT_TRAINED=${LIMIT_TRAINED:-12}
CONFIGS=${CONFIGS:-"base,uniform,expert:gsm8k,expert:arc,expert:squad,expert:codealpaca,tla:k=2,prompt,prompt,route=top1,tla:k=1,route=hidden,tla:k=1,route=hidden:2/top1,arrow,tla:k=1,route=arrow,tla:k=1,route=hidden:-2/peak:0.05,tla:k=1,route=spectr,prompt,route=softmax:0.05+spectr,prompt,route=gate:0.15+spectr"}
COMMON=(--loss --no-generation --batch-size 8 --device cpu --dtype fp32 --embedder-dtype fp32)
echo "=== held-out from $(date -u +%H:%M:%S)"
.venv/bin/loramix eval --tasks held-out --split test --configs "$CONFIGS" --limit "$LIMIT_HELD_OUT" "${COMMON[@]}" --out results/held-out
echo "=== trained from $(date -u +%H:%M:%S)"
.venv/bin/loramix eval --tasks trained --split test --configs "$CONFIGS" --limit "$LIMIT_TRAINED" "${COMMON[@]}" --out results/in-domain-loss
echo "=== done $(date -u +%H:%M:%S)"
