# Sourced by tools/gpu_check.sh and tools/gpu_serve.sh: the device runs' shared environment.
# Sets ROOT (the repository, also the working directory), OUT (created), PY; imports the tree through
# PYTHONPATH (the C++ extension may not build on the device image); nothing is fetched (offline hub, no pip
# index); TMEM_BENCH_TOKENIZER defaults to the tokenizer `make gpu-prepare` put in .gpu/tokenizer.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
PY=${PY:-$(command -v python3 || command -v python)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${TMEM_BENCH_TOKENIZER:-}" ] && [ -d "$ROOT/.gpu/tokenizer" ]; then
  export TMEM_BENCH_TOKENIZER=$ROOT/.gpu/tokenizer
fi
