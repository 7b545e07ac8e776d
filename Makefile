# Two entry points for a fresh machine: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean

setup: $(STAMP)

# Without a CUDA GPU, torch==2.13.0 (a CPU build) is installed first: a bare `torch` requirement with no torch
# installed would pull a multi-GB CUDA build. Where a CUDA GPU exists, plain torch (CUDA) is what we want.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch; \
	else \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check qlora_pipe tests tools
	$(BIN)/ruff format --check qlora_pipe tests tools

clean:
	rm -rf runs/ .tiny/
