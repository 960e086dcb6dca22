#!/usr/bin/env bash
# GPU benchmarks for sessions that are lent a CUDA machine: correctness first, then bf16 speed and
# measured peak memory at the LLaMA-350M and 1B shapes, eager and torch.compile(fullgraph=True).
#
#   bash benchmarks/gpu.sh                          # CUDA, < 10 min on one H100/H200: writes
#                                                   # benchmarks/results/{cuda_check,speed_cuda}.json, README tables
#   bash benchmarks/gpu.sh --device cpu --quick     # dry run on CPU at tiny sizes (tests/test_gpu_script.py);
#                                                   # writes to a temp dir (or --out DIR), never to results/
#
# Each stage has a wall-clock limit (timeout); speed.py saves after every mode of every model, so a
# stage cut short keeps what it measured. Override with CHECK_S, SPEED_350M_S, SPEED_1B_S (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEVICE=cuda QUICK=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1 (use --device cuda|cpu, --quick, --out DIR)" >&2; exit 2 ;;
  esac
done
RESULTS=benchmarks/results
if [ "$QUICK" = 1 ] || [ "$DEVICE" != cuda ]; then
  OUT=${OUT:-$(mktemp -d)}
  if [ "$(cd "$OUT" 2>/dev/null && pwd)" = "$(cd $RESULTS && pwd)" ]; then
    echo "gpu.sh: a dry run never writes over $RESULTS; pass another --out" >&2; exit 2
  fi
fi
OUT=${OUT:-$RESULTS}
mkdir -p "$OUT"
echo "gpu.sh: device=$DEVICE quick=$QUICK out=$OUT"

if [ "$QUICK" = 1 ]; then
  # seconds-scale: micro shapes, 2 fractions, b1 prefill; compile traced fullgraph without codegen
  $PY benchmarks/cuda_check.py --device "$DEVICE" --compile-backend eager --out "$OUT/cuda_check.json"
  $PY benchmarks/speed.py --device "$DEVICE" --dtype bfloat16 --models llama-micro --fractions 1.0 0.5 \
      --prefill-batches 1 --seq 16 --train-batch 2 --reps 1 --warmup 0 --compile --compile-backend aot_eager \
      --threads 1 --out "$OUT/speed_$DEVICE.json"
  echo "gpu.sh: dry run ok: $OUT"
  exit 0
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# 1. Correctness on the device: sliced == masked, compiled == eager, CUDA == CPU, ecospa vs transformers (fp32, bf16)
timeout "${CHECK_S:-150}" $PY benchmarks/cuda_check.py --device "$DEVICE" --out "$OUT/cuda_check.json"
# 2. bf16 speed + measured peak memory (torch.cuda.max_memory_allocated), dense vs pruned, eager and compiled
SPEED=(benchmarks/speed.py --device "$DEVICE" --dtype bfloat16 --seq 1024 --train-batch 8 --reps 10 --warmup 3
       --fractions 1.0 0.5 --compile --out "$OUT/speed_$DEVICE.json" --append)
rc=0
timeout "${SPEED_350M_S:-200}" $PY "${SPEED[@]}" --models llama-350m || rc=$?
timeout "${SPEED_1B_S:-230}" $PY "${SPEED[@]}" --models llama-1b --no-overhead || rc=$?
# 3. README tables from what was written (a stage cut short leaves partial rows, still reported)
[ "$OUT" = "$RESULTS" ] && $PY benchmarks/report.py
exit $rc
