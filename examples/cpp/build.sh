#!/usr/bin/env bash
# Build examples/cpp/run_model against the installed apache-tvm / apache-tvm-ffi wheels.
#   bash examples/cpp/build.sh [python] [output binary]
set -euo pipefail
PY=${1:-python3}
OUT=${2:-$(dirname "$0")/run_model}
read -r TVM FFI < <("$PY" -c "import os, tvm, tvm_ffi; print(os.path.dirname(tvm.__file__), os.path.dirname(tvm_ffi.__file__))")
g++ -std=c++17 -O2 "$(dirname "$0")/run_model.cc" -o "$OUT" \
  -I"$TVM/include" -I"$FFI/include" -I"$FFI/3rdparty/dlpack/include" \
  -L"$TVM/lib" -L"$FFI/lib" -ltvm_runtime -ltvm_ffi \
  -Wl,-rpath,"$TVM/lib" -Wl,-rpath,"$FFI/lib"
echo "$OUT"
