#!/usr/bin/env bash
# Install everything (see setup.sh), then lint and run the whole test suite on the CPU, one
# test process per core (each test file on one of them: its module fixtures are made once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -n auto --dist loadfile "$@"
