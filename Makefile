# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: a local CPU build. Unpinned, pip would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo demo-full-eval test lint typecheck unit bench install install-dev install-bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)

# Stamps make a second `make` skip the install; they are rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH) -e .
	@touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH) -e ".[bench]"
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH) -e ".[dev]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench

demo: install
	$(BIN)/distill4all run examples/demo.yaml
	echo "In one sentence, why can a 4-bit model run on a laptop CPU?" | \
		$(BIN)/distill4all chat runs/demo/export/model-q4_0.gguf --temperature 0 --max-tokens 96

# The demo's eval scores a seeded 60 of the 252 Self-Instruct items; this redoes eval with all.
demo-full-eval: install
	$(BIN)/distill4all run examples/demo.yaml --from eval --force --set eval.limit=null

# Every benchmark, each beside its peer, into bench/RESULTS.md (tens of minutes on 2 cores).
bench: install-bench
	@for b in bench/[a-z]*.py; do echo "== $$b"; $(BIN)/python $$b --write || exit 1; done

lint: install-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: install-dev
	$(BIN)/mypy

unit: install-dev
	$(BIN)/pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) runs
