#!/usr/bin/env bash
# Compile tvmflow's vendor kernels for CPU builds (tasks/build/native/*.cc) against installed
# packages, for the Python that runs tvmflow:
#   libtvmflow_dnnl.so  - oneDNN v3 (PyPI onednn + onednn-devel headers)
#   libtvmflow_cblas.so - OpenBLAS (PyPI scipy-openblas32)
#   scripts/build-cpu-contrib.sh [PYTHON] [OUT_DIR]
# Defaults: .venv/bin/python, artifacts/native (git-ignored). A library whose package is missing
# is skipped with a note; tasks.build.cpu_vendor loads what is there (TVMFLOW_NATIVE_DIR overrides
# where it looks). DNNL_INC / DNNL_LIB override where oneDNN's headers and libdnnl.so.3 are.
# Needs g++ (C++17).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=${2:-artifacts/native}
mkdir -p "$OUT"
read -r TVM_INC TVM_LIB FFI_INC FFI_LIB DNNL_INC DNNL_LIB BLAS_INC BLAS_LIB < <("$PY" - <<'PY'
import os, sys, sysconfig
import tvm_ffi
ffi = os.path.dirname(tvm_ffi.__file__)
tvm = os.path.join(os.path.dirname(ffi), "tvm")  # not imported: only its headers and runtime library
inc, lib = os.environ.get("DNNL_INC"), os.environ.get("DNNL_LIB")
for base in (sys.prefix, sysconfig.get_paths()["data"]):
    if inc:
        break
    if os.path.exists(os.path.join(base, "include", "oneapi", "dnnl", "dnnl.hpp")):
        inc, lib = os.path.join(base, "include"), os.path.join(base, "lib")
try:
    import scipy_openblas32 as ob
    binc, blib = ob.get_include_dir(), ob.get_lib_dir()
except ImportError:
    binc = blib = "-"
print(os.path.join(tvm, "include"), os.path.join(tvm, "lib"), os.path.join(ffi, "include"), os.path.join(ffi, "lib"), inc or "-", lib or "-", binc, blib)
PY
)
FLAGS=(-O3 -march=x86-64-v2 -std=c++17 -shared -fPIC -I"$FFI_INC" -L"$FFI_LIB" -Wl,-rpath,"$FFI_LIB")
if [ "$DNNL_INC" != "-" ]; then
  g++ "${FLAGS[@]}" -o "$OUT/libtvmflow_dnnl.so" tasks/build/native/cpu_vendor_dnnl.cc \
    -I"$DNNL_INC" -L"$DNNL_LIB" -ltvm_ffi -l:libdnnl.so.3 -Wl,-rpath,"$DNNL_LIB"
  echo "$OUT/libtvmflow_dnnl.so"
else
  echo "oneDNN headers not found (pip install onednn-devel): libtvmflow_dnnl.so skipped" >&2
fi
if [ "$BLAS_INC" != "-" ]; then
  g++ "${FLAGS[@]}" -o "$OUT/libtvmflow_cblas.so" tasks/build/native/cpu_vendor_cblas.cc \
    -I"$BLAS_INC" -I"$TVM_INC" -L"$BLAS_LIB" -L"$TVM_LIB" -ltvm_ffi -ltvm_runtime -lscipy_openblas \
    -Wl,-rpath,"$BLAS_LIB" -Wl,-rpath,"$TVM_LIB"
  echo "$OUT/libtvmflow_cblas.so"
else
  echo "scipy-openblas32 not installed: libtvmflow_cblas.so skipped" >&2
fi
