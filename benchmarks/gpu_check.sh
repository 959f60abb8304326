#!/usr/bin/env bash
# The CUDA path in one call of the device tool (a lent GPU machine): correctness + timings.
#   run: bash benchmarks/gpu_check.sh      (results land in $OUT, else the current folder)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
python3 -m pip install -q --no-deps -e . 2>/dev/null || python3 -m pip install -q -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
