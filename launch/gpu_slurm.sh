#!/usr/bin/env bash
# DeRTa training on multi-node GPUs under SLURM: one process per node driving all its GPUs,
# joined by jax.distributed (auto-detected from SLURM's environment).
#
#   sbatch --nodes=2 launch/gpu_slurm.sh --config=configs/llama3.py:8b --workdir /shared/run
#   bash launch/gpu_slurm.sh --dry-run --config=...   # print the srun command and environment
#
# Run from the project root after `bash scripts/setup.sh && .venv/bin/pip install
# 'jax[cuda12]==0.10.2'` on a shared filesystem; the workdir must be shared by all nodes.
#SBATCH --job-name=derta
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=derta-%j.log
set -euo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ $# -gt 0 ] || { echo "usage: sbatch launch/gpu_slurm.sh [--dry-run] TRAIN ARGS" >&2; exit 2; }

# XLA: overlap collectives with compute; let JAX take most of the GPU memory.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# NCCL: fail loudly instead of hanging; pick the InfiniBand/ethernet interface if the site needs it.
export NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
export TF_CPP_MIN_LOG_LEVEL=1

cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 .venv/bin/python -m derta_jax.train "$@")
if [ "$dry_run" -eq 1 ]; then
  for var in XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG; do
    printf 'export %s=%q\n' "$var" "${!var}"
  done
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
