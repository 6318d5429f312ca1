#!/usr/bin/env bash
# Every benchmark's CUDA mode, run from the repository root on a GPU machine: bash benchmarks/gpu_suite.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
$PY benchmarks/bench_load.py --device cuda
