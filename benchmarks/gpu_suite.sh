#!/usr/bin/env bash
# The benchmarks' CUDA modes, one line each, for a GPU machine: bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# serving: omnilm serve vs transformers serve (continuous batching), 1-64 streaming clients
$PY benchmarks/bench_serve.py --device cuda --clients 1 4 16 64 --max-tokens 128
