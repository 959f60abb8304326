#!/bin/sh
# Picks the model to serve, then runs the given command (by default `soft-serve ...`).
#   SOFT_MODEL set             -> that model (a path, a .gguf, or "default")
#   $MODEL_DIR has any entries -> $MODEL_DIR (the mounted checkpoint; default /model)
#   otherwise                  -> the embedded default model
# soft-serve reads SOFT_MODEL itself, so `docker run IMAGE soft-serve --model X` still wins.
set -eu
MODEL_DIR="${MODEL_DIR:-/model}"
if [ -z "${SOFT_MODEL:-}" ]; then
    if [ -d "$MODEL_DIR" ] && [ -n "$(ls -A "$MODEL_DIR" 2>/dev/null)" ]; then
        SOFT_MODEL="$MODEL_DIR"
    else
        SOFT_MODEL=default
    fi
fi
export SOFT_MODEL
echo "soft-entrypoint: SOFT_MODEL=${SOFT_MODEL}" >&2
exec "$@"
