#!/usr/bin/env bash
# `make gpu-serve`: the serve load run (issue 13) on a GPU at Qwen3-4B shapes, a second device run after
# `make gpu-check` when the time left allows. Random weights (the GPU image has no 4B model files), bf16, the
# SmolLM2 tokenizer from `make gpu-prepare` (carry .gpu). Random weights write no parseable flashcards, so the
# "memories" workload (explicit flashcards, one write per message) comes first; then "chat" (the model's own
# cards: empty writes here, so it times answers and card generation). Output: $OUT/06_serve.txt and .json.
set -u
source "$(dirname "$0")/gpu_env.sh"  # ROOT (cwd), OUT, PY, PYTHONPATH, offline, TMEM_BENCH_TOKENIZER
if ! "$PY" -c "import fastapi, uvicorn, httpx, openai" 2> /dev/null; then  # not in the GPU image: from .gpu/wheels
  SITE=/tmp/tmem_serve_site
  "$PY" -m pip install -q --find-links "$ROOT/.gpu/wheels" --target "$SITE" fastapi uvicorn httpx openai \
    > "$OUT/06_serve_install.txt" 2>&1 || echo "pip install of the serve stack failed (see 06_serve_install.txt)"
  export PYTHONPATH=$PYTHONPATH:$SITE  # (shadows the image's copies of shared dependencies: equal or newer)
fi
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cuda ]; then  # the issue's shapes on the card
  ARGS=(--model shapes-qwen3-4b --device cuda --dtype bfloat16 --messages "${MESSAGES:-4}")
else  # no CUDA: a dry run of the same plumbing at SmolLM2's shapes
  ARGS=(--model shapes-smollm2-135m --device cpu --dtype float32 --messages 1)
fi
[ -n "${TMEM_BENCH_TOKENIZER:-}" ] && ARGS+=(--tokenizer "$TMEM_BENCH_TOKENIZER")
{
  echo "tmem gpu-serve $(date -u +%Y-%m-%dT%H:%MZ) device=$DEVICE git=$(git log -1 --format=%h 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/card: /'
  timeout -k 10 "${CAP:-500}" "$PY" -m benchmarks.test_bench_serve "${ARGS[@]}" --workloads "${WORKLOADS:-memories,chat}" \
    --cap 240 --json "$OUT/06_serve.json"
  echo "rc=$?"
} > "$OUT/06_serve.txt" 2>&1
tail -12 "$OUT/06_serve.txt"
