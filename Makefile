# streammerge: every target installs what it needs into .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test fuzz test-gguf bench lint format clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare or open-ended torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The PEFT-oracle fuzz at length (make test runs a fixed seeded slice of 30): FUZZ_EXAMPLES draws with a
# fresh seed (FUZZ_SEED=N to replay one); prints the seed and what was merged, refused and why.
FUZZ_EXAMPLES ?= 300
FUZZ_SEED ?= $(shell date +%s)
fuzz: $(STAMP)
	@echo "PEFT-oracle fuzz: $(FUZZ_EXAMPLES) examples, seed $(FUZZ_SEED)"
	STREAMMERGE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) STREAMMERGE_FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/python -m pytest -q -s tests/test_peft_oracle.py

# Optional, not part of `make test`: byte-for-byte parity with llama.cpp's convert_hf_to_gguf.py and runs in
# llama.cpp. Installs llama-cpp-python from its source release (this compiles llama.cpp: about 6-8 minutes
# on 2 cores) and takes the converter from the same release, so both are the same llama.cpp version.
LLAMA_CPP_PYTHON ?= 0.3.36
GGUF_CHECK := .gguf-check
LLAMA_SRC := $(GGUF_CHECK)/llama_cpp_python-$(LLAMA_CPP_PYTHON)

$(LLAMA_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py: $(STAMP)
	mkdir -p $(GGUF_CHECK)
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(GGUF_CHECK)
	tar xzf $(GGUF_CHECK)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(GGUF_CHECK)
	touch $@

test-gguf: $(LLAMA_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install $(GGUF_CHECK)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	$(BIN)/python scripts/gguf_parity.py --llama-cpp $(LLAMA_SRC)/vendor/llama.cpp --run
	$(BIN)/python -m pytest -q tests/test_gguf.py

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check streammerge tests scripts
	$(BIN)/ruff format --check streammerge tests scripts

format: $(STAMP)
	$(BIN)/ruff format streammerge tests scripts
	$(BIN)/ruff check --fix streammerge tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache $(GGUF_CHECK)
