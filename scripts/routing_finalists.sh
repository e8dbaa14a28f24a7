#!/usr/bin/env bash
# The routing study's finalists on the test items of the headline table (ROUTING.md): ARC, SQuAD and CodeAlpaca
# in full, GSM8K's first 500. The paper's rule (tla:k=2), oracle and prompt are already there from
# reproduce_eval.sh. Resumable: items already in items.jsonl are skipped. One finalist at a time, SQuAD last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/smollm2-135m}
# tla:k=256,route=hidden:29/softmax:0.05 routes the leader once, on the prompt (256 >= every task's budget): the
# ablation that shows what re-routing every token changes (CodeAlpaca and SQuAD, where answers are long).
RUNS=${RUNS:-"tla:k=1,route=hidden:29/softmax:0.05@gsm8k tla:k=256,route=hidden:29/softmax:0.05@codealpaca
prompt,route=top1@gsm8k,codealpaca,arc,squad tla:k=256,route=hidden:29/softmax:0.05@squad
tla:k=1,route=hidden:2/top1@gsm8k,codealpaca,arc,squad"}
for run in $RUNS; do
  config=${run%@*}
  tasks=${run#*@}
  for task in ${tasks//,/ }; do
    limit=""
    [ "$task" = gsm8k ] && limit=500
    echo "=== $task $config from $(date -u +%H:%M:%S)"
    .venv/bin/loramix eval --tasks "$task" --configs "$config" --batch-size 16 ${limit:+--limit "$limit"} --out "$OUT"
  done
done
.venv/bin/loramix eval --out "$OUT" --report-only
