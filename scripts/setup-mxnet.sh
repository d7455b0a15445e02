#!/usr/bin/env bash
# Optional extra: the MXNet converter environment .venv-mxnet (pins in requirements-mxnet.txt).
# MXNet 1.9.1 cannot share the main venv (numpy<2, changes thread settings), so tvmflow runs it in
# a subprocess with this python: MXNet -> ONNX conversion and the MXNet validation reference.
# Idempotent: a second run only checks. The main .venv is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv-mxnet/.tvmflow-installed
want=$(sha256sum requirements-mxnet.txt | cut -c1-16)
if [[ -f $stamp && "$(cat $stamp)" == "$want" ]]; then exit 0; fi
[[ -x .venv-mxnet/bin/python ]] || "$PY" -m venv .venv-mxnet
.venv-mxnet/bin/pip install -q --disable-pip-version-check -r requirements-mxnet.txt
.venv-mxnet/bin/pip check
.venv-mxnet/bin/python tasks/importers/formats/mxnet_tool.py >/dev/null 2>&1 || [[ $? == 2 ]]  # imports mxnet: usage exit 2
echo "$want" > $stamp
