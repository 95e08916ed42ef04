"""Joining the processes of a multi-host run with JAX's own runtime (`jax.distributed`).

Three ways, in order: explicit flags (`--coordinator HOST:PORT --num_processes N --process_id I`,
what launch/local_multiprocess.sh passes); SLURM with several tasks; a Cloud TPU VM (JAX reads the
slice's workers from the TPU metadata). Anything else runs as a single process.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Mapping

import jax


def detect_cluster(env: Mapping[str, str] = os.environ) -> str | None:
    """'slurm', 'tpu' or None. Call before anything initialises a JAX backend."""
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    has_tpu = glob.glob("/dev/accel*") or (glob.glob("/dev/vfio/[0-9]*")
                                           and importlib.util.find_spec("libtpu") is not None)
    return "tpu" if has_tpu else None


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               env: Mapping[str, str] = os.environ) -> str:
    """Initialises jax.distributed when this is a multi-process run; returns how it was joined."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num_processes and --process_id go together "
                         f"(got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r})")
    # CPU collectives across processes (fake-device tests, CPU clusters); no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return "explicit"
    cluster = detect_cluster(env)
    if cluster is not None:
        jax.distributed.initialize()  # JAX auto-detects SLURM and Cloud TPU parameters
        return cluster
    return "single process"
