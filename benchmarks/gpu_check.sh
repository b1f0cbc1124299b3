#!/usr/bin/env bash
# GPU check (see benchmarks/gpu_check.py): install LEMA without dependencies into the GPU
# machine's Python (torch, transformers, safetensors... are already there) and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --out "${OUT:-.}" "$@"
