#!/usr/bin/env bash
# Every benchmark's CUDA mode, one after another, each table written to benchmarks/gpu_results/.
# Sized to finish within 8 minutes on one H100/H200 (15 minutes of device time a task, all tries).
# Run on the device machine from the repository root, with a CUDA build of torch in .venv:
#   make setup TORCH_SPEC="torch==2.11.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1

run() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.md" 2>&1
    echo "   exit $? -> $OUT/$name.md"
}

run generate 55 $PY benchmarks/bench_generate.py --preset llama-3.2-1b --repeats 2
run batching 45 $PY benchmarks/bench_batching.py --device cuda --dtype bfloat16 --requests 256 --max-batch 128
run vision 30 $PY benchmarks/bench_vision.py
run audio 30 $PY benchmarks/bench_audio.py
run image_gen 40 $PY benchmarks/bench_image_gen.py --device cuda --repeats 2
run train 40 $PY benchmarks/bench_train.py
run mllama 60 $PY benchmarks/bench_mllama.py --device cuda --new 64 --repeats 2
run serve 60 $PY benchmarks/bench_serve.py --device cuda --clients 1 16 64 --max-tokens 128 --rounds 1 --requests 1 --servers omnilm transformers
# low-bit inference: fp8 through torch._scaled_mm (capability >= 8.9), int4 through tinygemm, vs bf16 and
# transformers bf16 (the SQNR section runs on the CPU)
run quant 80 $PY benchmarks/bench_quant.py --device cuda --threads 4 --tokens 128 --sections sqnr,speed --rounds 3 --speed-schemes int8,int4,int4+head,fp8,nvfp4,mxfp4
run load 30 $PY benchmarks/bench_load.py --device cuda
