#!/usr/bin/env bash
# Set everything up (venv, pins, Debian packages for the real servers), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
