#!/usr/bin/env bash
# Trains the four experts of the shipped default bundle (bundles/smollm2-135m) and builds its router.
# Every step is resumable: re-run the script after an interruption and it continues where it stopped.
# Recorded settings and times end up in each expert's loramix_expert.json and in bundle.json.
set -euo pipefail
cd "$(dirname "$0")/.."
LORAMIX=${LORAMIX:-.venv/bin/loramix}
OUT=${OUT:-bundles/smollm2-135m}

$LORAMIX train gsm8k      --out "$OUT/experts/gsm8k"      --max-examples 2000 --epochs 1
$LORAMIX train arc        --out "$OUT/experts/arc"        --max-examples 1119 --epochs 1
$LORAMIX train squad      --out "$OUT/experts/squad"      --max-examples 1000 --epochs 1
$LORAMIX train codealpaca --out "$OUT/experts/codealpaca" --max-examples 1000 --epochs 1
# The router sees every training text of each task (train splits only, never test data).
$LORAMIX router build "$OUT" \
  --expert gsm8k="$OUT/experts/gsm8k" --expert arc="$OUT/experts/arc" \
  --expert squad="$OUT/experts/squad" --expert codealpaca="$OUT/experts/codealpaca"
