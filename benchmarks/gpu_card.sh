#!/usr/bin/env bash
# The GPU card of docs/benchmarks.md ("One GPU"), as one prepared command for a lent GPU machine
# (or any CUDA machine with torch + timm): the GPU benchmark eager and compiled, then a short
# end-to-end `train` on CUDA (bf16 autocast, pinned memory, persistent workers, test at the end).
# Writes each step's output to $OUT (default ./outputs/gpu_card). Each step has its own time limit,
# so one that hangs or fails does not cost the others.
#
#     bash benchmarks/gpu_card.sh
#     SKIP_EAGER=1 COMPILE_LIMIT=130 COMPILE_BATCHES=64 bash benchmarks/gpu_card.sh   # the second call made here
#
# SKIP_EAGER: skip the eager benchmark; COMPILE_LIMIT: seconds for the compiled one (default 240);
# COMPILE_BATCHES: its batch sizes (default 64,128); PY: the python (default python3).
set -uo pipefail
OUT=${OUT:-outputs/gpu_card}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 C2S_OUTPUTS=${C2S_OUTPUTS:-/tmp/c2s_outputs}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
echo "cpu cores: $(nproc)" | tee -a "$OUT/gpu.txt"

[ -n "${SKIP_EAGER:-}" ] || timeout 200 "$PY" benchmarks/bench_gpu.py 2>&1 | tee "$OUT/bench_eager.txt"
read -r ROOT TABLE < <("$PY" -c "from helpers.core import config; from helpers.experiments import artifacts
root, table = artifacts.ensure_prepared(config.get_config('demo'), progress=False); print(root, table)")
timeout 150 "$PY" -m helpers train --profile demo --device cuda --backbone efficientnet_b3 --weights none \
    --img-size 288 --p-items 32 --epochs 2 --table "$TABLE" --data-root "$ROOT" --out "$C2S_OUTPUTS/gpu_train" 2>&1 | tr '\r' '\n' |
    grep -v 'it/s\]$' | tee "$OUT/train.txt"
cp "$C2S_OUTPUTS/gpu_train/metrics.json" "$C2S_OUTPUTS/gpu_train/history.csv" "$OUT/" 2>/dev/null
timeout ${COMPILE_LIMIT:-240} "$PY" benchmarks/bench_gpu.py --compile --batches ${COMPILE_BATCHES:-64,128} 2>&1 | tee "$OUT/bench_compile.txt"
echo "gpu_card done"
