#!/usr/bin/env bash
# Set everything up, then compile the bundled EfficientNet-Lite0 for this machine (device `local`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tvmflow compile "$@"
