#!/usr/bin/env bash
# One command: set up .venv with the dev requirements and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# One worker per core; whole files per worker so module fixtures are built once.
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
