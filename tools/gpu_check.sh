#!/usr/bin/env bash
# `make gpu-check`: the project's one prepared device run. From the repository root on a GPU machine with only
# the image's packages (torch, Triton, transformers, peft, pytest-benchmark; nothing downloadable):
#
#     make gpu-check            (= timeout 480 bash tools/gpu_check.sh)
#
# Phases, in the order they run, each capped with `timeout` inside one deadline (DEADLINE seconds after start), so
# a hang in one keeps the others' results, and what a tight deadline cuts is what earlier runs already showed:
#   install      pip install -e . --no-deps --no-build-isolation, in the background (the C++ extension may fail
#                to build there: nothing waits for it, every phase imports the tree through PYTHONPATH)
#   tests_cuda   the CUDA-only tests (graphs, streams, int64 offsets, graphed writes, batched vs sequential writes)
#   write_qwen3  the write at Qwen3-4B shapes, bf16, random weights: fast path with and without CUDA graphs,
#                torch path, PEFT (benchmarks/test_bench_write_shapes.py)
#   profile      where one Qwen3-4B write's time goes: host phases, device busy time, launches and waits, top
#                kernels (benchmarks/profile_write.py)
#   pool         the session pool at SmolLM2 and Qwen3-4B shapes: a decode batch of one session per row vs the
#                bare model and vs swapping, 1,000 resident sessions, batched vs sequential writes
#                (benchmarks/test_bench_pool.py; needs a tokenizer: `make gpu-prepare` here, carry .gpu)
#   profile_pool where a batched pool write's time goes: 16 sessions x 8 new cards at Qwen3-4B shapes (issue 10's
#                write), timed against one session's write alone, then profiled as `profile` does
#                (benchmarks/profile_write.py --cases pool16x8; token-level cards: no tokenizer needed)
#   decode       the decode dispatch per MLP call (cuBLAS vs fused) and tokens/s with a written adapter vs the
#                bare model (benchmarks/test_bench_decode.py)
#   tests_runtime   the runtime tests on CUDA (~2 min on an H200: the deadline usually cuts them)
#   tests_kernels, kernels   the kernel tests on CUDA vs float64 (lora_mlp, segmented, optimizer steps, rms_norm,
#                cross-entropy, rope, add_rms_norm, qk_norm_rope, swiglu); lora_mlp fwd+bwd and the optimizer steps
#                with each one's share of the card's bound, per-kernel shares from the profiler; rms_norm, rope,
#                add_rms_norm and swiglu fwd+bwd, fused vs HF's composition
#   write_smollm2   the write at SmolLM2 shapes
# The phases do not fit one 8-minute call: `make gpu-check` runs them in this order until its deadline, and
# `make gpu-tests` (a second call, when the device time allows) runs only the test and kernel phases
# (GPU_PHASES="tests_runtime tests_kernels kernels write_smollm2": a phase not named is left out).
# Output: at most 8 files under $OUT (./gpu_out when unset); 00_summary.txt says the card, the versions and each
# phase's status. Without CUDA it is a dry run (the same plumbing, CUDA-only parts skipped or shortened).
set -u
source "$(dirname "$0")/gpu_env.sh"  # ROOT (cwd), OUT, PY, PYTHONPATH, offline, TMEM_BENCH_TOKENIZER
DEADLINE=${DEADLINE:-450}
export TRITON_DEFAULT_FP_FUSION=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tmem_triton_cache}  # one cache for every phase: compile once
unset TRITON_INTERPRET TMEM_BENCH_SLOW TMEM_BENCH_DTYPE TMEM_DECODE_PATH
SUMMARY=$OUT/00_summary.txt
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs)
BENCH=(--benchmark-columns=min,median,rounds --benchmark-sort=name)

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DRY=0
else  # no CUDA: prove the plumbing only (CPU, interpreter; small selections, few rounds)
  DRY=1
  export TRITON_INTERPRET=1
fi

phase() {  # phase NAME CAP_SECONDS LOGFILE CMD...   (the cap is clamped to what is left before DEADLINE)
  local name=$1 cap=$2 log=$3; shift 3
  if [ -n "${GPU_PHASES:-}" ] && [[ " $GPU_PHASES " != *" $name "* ]]; then return 0; fi  # not selected
  local left=$((DEADLINE - SECONDS)) t0=$SECONDS
  local t=$((cap < left ? cap : left))
  if ((t < 20)); then echo "$name SKIPPED (${left}s left before the deadline)" >> "$SUMMARY"; return 0; fi
  echo "===== $name (cap ${t}s, start +${SECONDS}s): $*" >> "$log"
  local from=$(wc -l < "$log")
  timeout -k 5 "$t" "$@" >> "$log" 2>&1
  local rc=$? note=""
  if ((rc == 124 || rc == 137)); then note=" TIMED OUT"; fi
  if ((rc == 5)); then note=" (no test selected here)"; fi
  local result
  result=$(tail -n +$((from + 1)) "$log" | grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)" \
    | tail -1 | tr -d '=')  # this phase's own lines only (phases share logs)
  echo "$name rc=$rc took=$((SECONDS - t0))s cap=${t}s$note | ${result:-no pytest result line}" >> "$SUMMARY"
}

# ---- environment: the card, the versions (the summary's head) ------------------------------------------------
{
  echo "tmem gpu-check $(date -u +%Y-%m-%dT%H:%MZ) dry_run=$DRY deadline=${DEADLINE}s"
  echo "git: $(git log -1 --format='%h %s' 2>/dev/null | cut -c1-100)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv,noheader 2>&1 \
      | sed 's/^/card: /' | head -2
  else
    echo "card: none (no nvidia-smi)"
  fi
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as md
import platform
vs = []
for p in ("torch", "triton", "transformers", "peft", "numpy", "pytest-benchmark", "safetensors"):
    try:
        vs.append(f"{p} {md.version(p)}")
    except md.PackageNotFoundError:
        vs.append(f"{p} MISSING")
print("python", platform.python_version(), "|", ", ".join(vs))
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB,"
          f" CUDA {torch.version.cuda}, float32 matmul precision {torch.get_float32_matmul_precision()}")
else:
    print("device: no CUDA (dry run on CPU)")
EOF
  echo "--- phases"
} > "$SUMMARY"

# ---- install in the background unless done already (the native CPU extension may fail to build here: nothing
#      waits for it; a second build would overwrite the extension in place under running phases, so never twice) --
INSTALL_LOG=$OUT/01_install.txt
if "$PY" -c "import importlib.metadata as m; m.version('tmem')" > /dev/null 2>&1; then
  echo "tmem already installed: $("$PY" -m pip show tmem 2>/dev/null | grep -E '^(Version|Location|Editable)' | tr '\n' ' ')" \
    > "$INSTALL_LOG"
  INSTALL_PID=
else
  (timeout 200 "$PY" -m pip install -e . --no-deps --no-build-isolation > "$INSTALL_LOG" 2>&1
   echo "pip install rc=$?" >> "$INSTALL_LOG") &
  INSTALL_PID=$!
fi

# Order: what a run can newly tell first. The CUDA-only and runtime tests (fixes since the last run), the write
# at Qwen3-4B shapes and its profile, decode, the pool; then the kernel tests and kernel benchmarks (kernels
# unchanged since they last passed) and the write at SmolLM2 shapes, which a tight deadline may cut.
# every test file that runs a Triton kernel on the `device` fixture's device (test_rsvd.py is a runtime test)
KERNEL_TESTS=(tests/test_lora_mlp.py tests/test_update.py tests/test_rms_norm.py tests/test_lora_segmented.py
              tests/test_cross_entropy.py tests/test_rope.py tests/test_add_rms_norm.py tests/test_qk_norm_rope.py
              tests/test_swiglu.py tests/test_lora_mlp_composed.py)
RUNTIME_TESTS=(tests/test_write_steps.py tests/test_fast_weights.py tests/test_host_syncs.py tests/test_rsvd.py
               tests/test_pool.py tests/test_own_attention.py tests/test_trunk_halves.py)
WRITE_BENCH=("${PYTEST[@]}" benchmarks/test_bench_write_shapes.py)
KERNEL_BENCH=("${PYTEST[@]}" benchmarks/test_bench_lora_mlp.py benchmarks/test_bench_update.py benchmarks/test_bench_rms_norm.py
              benchmarks/test_bench_rope.py benchmarks/test_bench_add_rms_norm.py benchmarks/test_bench_swiglu.py
              benchmarks/test_bench_lora_mlp_composed.py)
POOL_READY=1
if [ -z "${TMEM_BENCH_TOKENIZER:-}" ]; then POOL_READY=0; fi

if ((DRY)); then  # the same phases, shortened (CPU, interpreter)
  phase tests_cuda 60 "$OUT/02_tests.txt" "${PYTEST[@]}" "${KERNEL_TESTS[@]}" "${RUNTIME_TESTS[@]}" -m cuda
  phase tests_runtime 240 "$OUT/02_tests.txt" "${PYTEST[@]}" "${RUNTIME_TESTS[@]}" -m "not cuda and not slow" \
    -k "fixed_shape or never_read"
  phase write_smollm2 240 "$OUT/03_bench_write.txt" "${WRITE_BENCH[@]}" -k "smollm2-N512 and not peft" \
    --benchmark-disable  # (Qwen3-4B's fp32 weights are 16 GB: its shapes run on CUDA only)
  phase profile 120 "$OUT/03_bench_write.txt" "$PY" benchmarks/profile_write.py --writes 1
  phase decode 240 "$OUT/07_bench_decode.txt" "${PYTEST[@]}" benchmarks/test_bench_decode.py \
    -k "smollm2 and (N4 or tokens)" "${BENCH[@]}"
  echo "pool SKIPPED (dry run: the CPU figures come from \`make bench\`)" >> "$SUMMARY"
  phase profile_pool 60 "$OUT/03_bench_write.txt" "$PY" benchmarks/profile_write.py --cases pool2x4 --writes 1
  phase tests_kernels 240 "$OUT/02_tests.txt" "${PYTEST[@]}" "${KERNEL_TESTS[@]}" -m "not cuda" \
    -k "decode_paths or split_k_with_tails or rejects_wrong"
  phase kernels 120 "$OUT/06_bench_kernels.txt" "${KERNEL_BENCH[@]}" -k "smollm2 and not N4096" "${BENCH[@]}"
else
  # ---- 1. the CUDA-only tests (graphs, streams, int64 offsets, TF32, graphed writes, batched writes vs
  #         sequential ones in each step mode). The CPU compile check and the slow real-model CPU tests are left
  #         out (same wheel, same result as on the CPU box).
  phase tests_cuda 120 "$OUT/02_tests.txt" "${PYTEST[@]}" "${KERNEL_TESTS[@]}" "${RUNTIME_TESTS[@]}" -m cuda \
    --durations=5
  # ---- 2. the write at Qwen3-4B shapes (auto, auto-eager, torch, PEFT), then where one write's time goes
  phase write_qwen3 90 "$OUT/03_bench_write.txt" "${WRITE_BENCH[@]}" -k qwen3 "${BENCH[@]}"
  phase profile 60 "$OUT/03_bench_write.txt" "$PY" benchmarks/profile_write.py
  # ---- 3. the session pool (needs a tokenizer: the GPU image has none)
  if ((POOL_READY)); then
    phase pool 115 "$OUT/05_bench_pool.txt" "${PYTEST[@]}" benchmarks/test_bench_pool.py "${BENCH[@]}" -s
  else
    echo "pool SKIPPED (no tokenizer: run \`make gpu-prepare\` before the device run and carry .gpu)" >> "$SUMMARY"
  fi
  # ---- 3b. where the pool's batched write of 16 sessions goes (after `pool`: its Triton kernels are compiled;
  #          its own phase: the `profile` phase's six profiles take ~41 s of their 60), with Triton's segmented
  #          kernels (`auto`) and with the torch composition (per-segment addmm): which one the pool should pick
  phase profile_pool 65 "$OUT/03_bench_write.txt" "$PY" benchmarks/profile_write.py --cases pool16x8 --backends auto torch
  # ---- 4. decode: the dispatch per MLP call, and per token with a written adapter vs the bare model
  phase decode 80 "$OUT/07_bench_decode.txt" "${PYTEST[@]}" benchmarks/test_bench_decode.py "${BENCH[@]}"
  # ---- 5. the runtime tests on CUDA (FastWeights, write steps, host syncs, rSVD, pool: ~2 minutes on an H200);
  #         a tight deadline cuts them here, and `make gpu-tests` (the second call) runs them whole
  phase tests_runtime 200 "$OUT/02_tests.txt" "${PYTEST[@]}" "${RUNTIME_TESTS[@]}" -m "not cuda and not slow" \
    --durations=5
  # ---- 6. the kernel tests on CUDA vs float64, the kernel benchmarks (each op's and each Triton kernel's share
  #         of the bound), the write at SmolLM2 shapes
  phase tests_kernels 160 "$OUT/02_tests.txt" "${PYTEST[@]}" "${KERNEL_TESTS[@]}" -m "not cuda" \
    -k "not gpu_compile and not sm90" --durations=5  # (the sm_90 compile checks: the same result as on the CPU)
  phase kernels 70 "$OUT/06_bench_kernels.txt" "${KERNEL_BENCH[@]}" "${BENCH[@]}"
  phase write_smollm2 60 "$OUT/03_bench_write.txt" "${WRITE_BENCH[@]}" -k smollm2 "${BENCH[@]}" \
    --benchmark-json="$OUT/04_bench_write_smollm2.json"
fi

# ---- wrap up: the install's result, the benchmark summaries, the failures -----------------------------------
if [ -n "$INSTALL_PID" ] && kill -0 "$INSTALL_PID" 2>/dev/null; then
  echo "install still running at +${SECONDS}s (left running; phases used PYTHONPATH)" >> "$SUMMARY"
else
  echo "install: $(tail -1 "$INSTALL_LOG" 2>/dev/null)" >> "$SUMMARY"
fi
"$PY" -c "import tmem_kernels._native" > /dev/null 2>&1 && echo "native extension: importable" >> "$SUMMARY" \
  || echo "native extension: not importable (CPU backend only; not needed on CUDA)" >> "$SUMMARY"
{
  echo "--- failures (first 20)"
  grep -hE "^(FAILED|ERROR) " "$OUT"/0[2-7]_*.txt 2>/dev/null | cut -c1-240 | head -20
  echo "--- benchmark summaries"
  for f in "$OUT"/03_bench_write.txt "$OUT"/06_bench_kernels.txt "$OUT"/05_bench_pool.txt "$OUT"/07_bench_decode.txt; do
    [ -f "$f" ] || continue
    echo "## $(basename "$f")"
    # each suite prints its table after its last test: from the first summary header to the pytest result line
    awk '/^(one write|lora_mlp forward|optimizer step|per-kernel|decode,|\[pool\])/{p=1} p && /^(-----|=====)/{p=0} p' "$f" \
      | grep -v '^\.*$' | head -60
  done
  if [ -f "$OUT/03_bench_write.txt" ]; then
    echo "## profile of one write"
    sed -n '/^profile of one write/,/^=====/p' "$OUT/03_bench_write.txt" | grep -v -e '^=====' -e USDT | head -90
    echo "## profile of a batched pool write"
    sed -n '/^profile of a batched pool write/,/^=====/p' "$OUT/03_bench_write.txt" | grep -v -e '^=====' -e USDT \
      | head -40
  fi
  echo "total +${SECONDS}s"
} >> "$SUMMARY"
ls "$OUT" | head -20 | sed 's/^/file: /' >> "$SUMMARY"
echo "gpu-check done in ${SECONDS}s: $SUMMARY"
