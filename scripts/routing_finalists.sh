#!/usr/bin/env bash
# The routing study's finalists on the test items of the headline table (ROUTING.md): ARC, SQuAD and CodeAlpaca
# in full, GSM8K's first 500. The paper's rule (tla:k=2), oracle and prompt are already there from
# reproduce_eval.sh. Resumable: items already in items.jsonl are skipped. One finalist at a time, SQuAD last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/smollm2-135m}
FINALISTS=${FINALISTS:-"tla:k=1,route=hidden:29/softmax:0.05 prompt,route=top1 tla:k=1,route=hidden:2/top1"}
for config in $FINALISTS; do
  for task in gsm8k codealpaca arc squad; do
    limit=""
    [ "$task" = gsm8k ] && limit=500
    echo "=== $task $config from $(date -u +%H:%M:%S)"
    .venv/bin/loramix eval --tasks "$task" --configs "$config" --batch-size 16 ${limit:+--limit "$limit"} --out "$OUT"
  done
done
.venv/bin/loramix eval --out "$OUT" --report-only
