#!/usr/bin/env bash
# Lint, format check and type check (the same as the pre-commit hooks); CI runs it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy flows tasks
