#!/usr/bin/env bash
# Every benchmark's CUDA mode, one after another, for a machine with a GPU. Paste the tables into
# RESULTS.md with the date, the GPU and the command. Usage: bash benchmarks/gpu_suite.sh [python]
set -euo pipefail
PY=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."

# low-bit inference: fp8 through torch._scaled_mm (compute capability >= 8.9), int4 through tinygemm,
# tok/s against bf16 and transformers bf16 (the SQNR section runs on the CPU)
$PY benchmarks/bench_quant.py --device cuda --threads 4 --tokens 128 --sections sqnr,speed --speed-schemes int8,int4,fp8,nvfp4,mxfp4
