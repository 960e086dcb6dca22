#!/usr/bin/env bash
# GPU benchmarks for sessions that are lent a CUDA machine: the same scripts, bf16, real sizes.
# Usage: bash benchmarks/gpu.sh   (writes benchmarks/results/speed_cuda.json, then regenerates tables)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# Correctness on CUDA first (sliced == masked, compiled == eager, CUDA == CPU), then speed.
$PY benchmarks/cuda_check.py
$PY benchmarks/speed.py --device cuda --dtype bfloat16 --models llama-60m gpt2-small llama-350m llama-1b \
    --seq 1024 --train-batch 8 --reps 20 --warmup 5 --compile
$PY benchmarks/report.py
