#!/usr/bin/env bash
# Build TVM's cuDNN / cuBLAS contrib runtime library on a GPU host from the sources inside the
# installed apache-tvm wheel, against the CUDA/cuDNN/cuBLAS headers and libraries found under
# CUDA_HOME, /usr/local/cuda and site-packages/nvidia/* (torch's CUDA wheels), or TVMFLOW_CUDA_ROOTS.
#   scripts/build-cuda-contrib.sh OUT_DIR [cudnn] [cublas]
# Writes OUT_DIR/libtvmflow_cuda_contrib.so and OUT_DIR/runtime_libraries.json (name, sha256).
set -euo pipefail
exec python3 -m tasks.build.cuda_vendor "$@"
