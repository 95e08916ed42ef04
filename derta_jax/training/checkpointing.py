"""Run checkpoints: one Orbax CheckpointManager saving the train state and the data iterator.

    <workdir>/checkpoints/<step>/state   step, params, lora, opt_state, rng (StandardSave)
    <workdir>/checkpoints/<step>/data    the grain iterator state

A checkpoints folder that holds something but no readable checkpoint stops the run with an error
naming it: a run never silently restarts from scratch.
"""
from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: str | pathlib.Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, loader: Any) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(loader)),
              force=True)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest finished checkpoint's step; None for an empty folder; ValueError when the folder
    has entries but none is a readable checkpoint."""
    step = mngr.latest_step()
    directory = pathlib.Path(mngr.directory)
    if step is None and directory.exists() and any(directory.iterdir()):
        names = ", ".join(sorted(p.name for p in directory.iterdir())[:5])
        raise ValueError(f"{directory} holds {names} but no readable checkpoint; remove it to start "
                         "from scratch or point --workdir elsewhere")
    return step


def restore(mngr: ocp.CheckpointManager, step: int, shardings: Any, abstract_state: Any,
            loader: Any) -> Any:
    """The state saved at `step`, placed on `shardings`; `loader` continues where it was saved."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    path = pathlib.Path(mngr.directory) / str(step)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(loader)))
    except Exception as e:  # Orbax raises many types; name the checkpoint in every case
        raise ValueError(f"cannot restore checkpoint {path}: {type(e).__name__}: {e}") from e
    return restored["state"]
