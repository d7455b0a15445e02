#!/usr/bin/env bash
# The issue-17 scale-out benchmark on a lent GPU machine (device tool), repo root: ResNet-18 fp16
# batch 1, one trial budget, tuned with 1, 2, 4, 8 GPU workers (one rpc server per GPU, capped at
# the GPUs present). Installs the carried wheels with bench/gpu_device.sh (same .whl1/.whl2 calls):
#   call 1: carry .whl1                  -> bash bench/gpu_scaleout.sh stage
#   call 2: carry .whl2                  -> bash bench/gpu_scaleout.sh [TRIALS] [COUNTS]
#                                           e.g. bash bench/gpu_scaleout.sh 256 1,2   (kind nvidia-h200-x2)
#                                                bash bench/gpu_scaleout.sh 256 4,8   (kind nvidia-h200-x8)
# One call has at most 10 minutes: split the counts over calls; each call's $OUT/gpu_scaleout.json
# keeps the rows it finished. Here: python bench/gpu_scaleout.py --report <the calls' files>
# merges them into bench/results/gpu_scaleout.json.
set -u
OUT=${OUT:-/root/out}
mkdir -p "$OUT"
bash bench/gpu_device.sh || exit $?          # stage/install the wheels; prints the GPUs
[ "${1:-}" = stage ] && exit 0
TRIALS=${1:-256}
COUNTS=${2:-1,2,4,8}
export PYTHONPATH="/root/site:$PWD" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
timeout "${BENCH_TIMEOUT:-580}" python3 bench/gpu_scaleout.py --trials "$TRIALS" --gpus "$COUNTS" \
  --work /root/scaleout --cache /root/gpucache --out "$OUT" 2>&1 | tee "$OUT/gpu_scaleout.log" | grep -v Warning | tail -60
ls -la "$OUT"
