#!/usr/bin/env bash
# The CUDA modes of the benchmarks, one line each; run on a GPU machine from the repository root.
set -euo pipefail
PY=${PY:-.venv/bin/python}

# [mllama] prefill one 4-tile image + 64 decode steps vs transformers, bf16, 11B shapes cut to 8 text layers
$PY benchmarks/bench_mllama.py --device cuda --new 64 --repeats 3
