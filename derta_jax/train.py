"""Train a model with DeRTa: `python -m derta_jax.train --config=configs/llama3.py:8b --workdir DIR`.

Every config key can be overridden (`--config.train.steps=100`). Multi-host: under SLURM and on
Cloud TPU VMs jax.distributed is initialised automatically; elsewhere pass --coordinator HOST:PORT
--num_processes N --process_id I on every process (launch/local_multiprocess.sh does). Only process 0
writes logs. See derta_jax/training/loop.py for what a workdir holds.

A user error (a bad config value, a missing or bad input file, a workdir in use or holding another
run) is one line on stderr naming the key or file, exit code 2; a run stopped by a non-finite step
or a full disk is one line, exit code 1; anything unexpected keeps its traceback.
"""
from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from derta_jax import cli
from derta_jax.training import checkpointing, distributed, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics, model/)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "jax.distributed coordinator HOST:PORT")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "jax.distributed process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's id in [0, num_processes)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with cli.user_errors((OSError,)):
        config = _CONFIG.value
        config.to_dict()  # the file is loaded on first use: a missing one is an OSError here
    try:
        joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
    logging.getLogger("derta_jax").setLevel(
        logging.INFO if jax.process_index() == 0 else logging.WARNING)
    logging.getLogger("derta_jax").info("process %d of %d (%s)", jax.process_index(),
                                        jax.process_count(), joined)
    try:
        with cli.user_errors():  # a bad key or file: exit code 2
            metrics = loop.train(config, _WORKDIR.value)
    except (loop.Diverged, checkpointing.DiskFullError) as e:  # the run stopped for a known reason
        cli.fail(e, 1)
    if metrics and jax.process_index() == 0:
        print({k: round(v, 4) for k, v in metrics.items()})


def _dashes_to_underscores(argv: list[str]) -> list[str]:
    """Accepts --num-processes / --process-id as well as the absl spelling."""
    out = []
    for a in argv:
        for dashed in ("--num-processes", "--process-id"):
            if a == dashed or a.startswith(dashed + "="):
                a = a.replace(dashed, dashed.replace("-", "_").replace("__", "--"), 1)
        out.append(a)
    return out


def run() -> None:
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, argv=_dashes_to_underscores(sys.argv), flags_parser=cli.parse_absl_flags)


if __name__ == "__main__":
    run()
