#!/usr/bin/env bash
# Single-GPU benchmark: bf16 matmul peak, train-step MFU of a 1B-class LLaMA, generation tokens/s.
#
#   benchmarks/gpu.sh [--batch 8] [--remat none|full|dots] [--steps 5] [--out figures.json]
#
# Uses the project venv (.venv, or $PYTHON). If jax there has no GPU backend, installs
# jax[cuda12]==0.10.2 into it (nothing else), then runs benchmarks/gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

has_gpu() {
  "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null
}

if ! has_gpu; then
  echo "jax has no GPU backend: installing jax[cuda12]==0.10.2" >&2
  "$PY" -m pip install --quiet "jax[cuda12]==0.10.2"
  has_gpu || { echo "error: still no GPU backend after installing jax[cuda12]" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m benchmarks.gpu_bench "$@"
