#!/usr/bin/env bash
# The GPU check, for any session that is lent a GPU: the CUDA tests, `loramix serve` under `loramix loadtest` (its own
# experts-off route beside the default), the lean decode step against transformers' (scripts/lean_steps.py: on a
# GPU loramix uses transformers' step until this says the lean one pays), and `loramix bench` (scripts/gpu_bench.py),
# on a randomly initialised Llama-2-7b-shaped model with four random r=64 q/v experts in bf16. Under 8 minutes on an
# H200. Figures go to OUT.
#
#   here, once:         scripts/gpu_check.sh prepare    # .gpu/ (tokenizer, embedder config, prompts) and .whl/ (the
#                                                       # serving wheels the GPU image lacks); both git-ignored
#   on the lent GPU:    device run, carry [".gpu", ".whl"], command: bash scripts/gpu_check.sh run
#   a dry run here:     TINY=1 scripts/gpu_check.sh run  # every step on a tiny model on this CPU (~3 min)
#
# Then commit OUT's files under benchmarks/ with the date and hardware, and update BENCHMARKS.md's GPU section.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
OUT=${OUT:-gpu-check}
WORK=${WORK:-/tmp/loramix-gpu-check}
# The serving stack: the GPU image has the rest (torch, transformers, peft, sentence-transformers, typer, rich, httpx).
WHEELS="fastapi starlette pydantic pydantic_core annotated-types typing-inspection typing_extensions uvicorn h11 anyio"

if [ "$MODE" = prepare ]; then
  PY=${PYTHON:-.venv/bin/python}
  $PY scripts/gpu_bench.py prepare --assets .gpu
  rm -rf .whl && mkdir -p .whl
  for name in $WHEELS; do
    version=$($PY -c "import importlib.metadata as m; print(m.version('$name'))")
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$name==$version"
  done
  du -sh .gpu .whl
  exit 0
fi
[ "$MODE" = run ] || { echo "usage: scripts/gpu_check.sh prepare|run" >&2; exit 2; }
[ -d .gpu ] || { echo ".gpu is missing: run 'scripts/gpu_check.sh prepare' here first and carry .gpu" >&2; exit 2; }

if [ -n "${TINY:-}" ]; then
  PY=${PYTHON:-.venv/bin/python}
  SIZE=(--tiny)
  PLACE=(--device cpu --dtype fp32)
  BENCH=(--tokens 16 --batches 1 4 --repeats 1)
  LOAD=(--clients 1,4 --requests 4 --max-tokens 16)
else
  PY=${PYTHON:-python3}
  SIZE=()
  PLACE=(--device cuda --dtype bf16)
  BENCH=(--tokens 128 --batches 1 16 --repeats 2)
  LOAD=(--clients 1,16 --requests 32 --max-tokens 64)
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORAMIX_HOME=$WORK/home
mkdir -p "$OUT" "$WORK"
started=$(date +%s)
step() { echo "=== $1 at $(($(date +%s) - started)) s"; }

step "machine"
$PY - >"$OUT/machine.json" <<'EOF'
import json, platform, subprocess, torch, transformers, peft
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                  "peft": peft.__version__, "python": platform.python_version(), "commit": commit or None}))
EOF
cat "$OUT/machine.json"

step "tiny bundle and the CUDA tests"
$PY scripts/gpu_bench.py bundle --assets .gpu --out "$WORK/tiny-bundle" --tiny --dtype fp32
LORAMIX_CUDA_TEST_BUNDLE=$WORK/tiny-bundle $PY -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
  2>&1 | tee "$OUT/cuda-tests.txt" || true

step "the random 7B-shaped bundle"
$PY scripts/gpu_bench.py bundle --assets .gpu --out "$WORK/bundle" "${SIZE[@]}"

step "serve and loadtest"
port=8031
$PY -m loramix serve --bundle "$WORK/bundle" --port $port "${PLACE[@]}" >"$WORK/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  $PY -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { tail -30 "$WORK/serve.log"; exit 1; }
  sleep 1
done
for route in hidden base; do  # the default route, and its own experts-off loop
  $PY -m loramix loadtest --url "http://127.0.0.1:$port" --route $route "${LOAD[@]}" --out "$OUT/loadtest-$route.json"
done
kill -TERM $server && wait $server || true
trap - EXIT

step "the lean decode step against transformers' (paired)"
$PY scripts/lean_steps.py --bundle "$WORK/bundle" "${PLACE[@]}" --batches 1,16 --steps 40 --gpu \
  2>&1 | tee "$OUT/lean-steps.txt" || true

step "bench"
$PY scripts/gpu_bench.py run --assets .gpu --out "$OUT/bench" --work "$WORK/bench" "${SIZE[@]}" "${BENCH[@]}"
step "done"
ls -la "$OUT" "$OUT/bench"
