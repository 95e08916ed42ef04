"""Run checkpoints: one Orbax CheckpointManager saving the train state and the data iterator.

    <workdir>/checkpoints/<step>/state        step, params, lora, opt_state, rng (StandardSave)
    <workdir>/checkpoints/<step>/data         the grain iterator state
    <workdir>/checkpoints/<step>/checksum     a checksum of every state leaf (JSON)
    <workdir>/checkpoints/unreadable-<step>/  a step that could not be read (set aside, never deleted)
    <workdir>/checkpoints/superseded-<step>/  a step newer than checkpoint.restore_step (set aside)

`restore_newest` restores the newest step that reads completely, holds finite values and matches
the checksums written with it (damage that still decodes, such as flipped bytes in a tensor file,
changes them; a step saved before checksums existed is not checked); a step that fails is moved
to `unreadable-<step>/` with a warning naming it and the reason, and the one before it is tried.
A folder that holds something but no readable step stops the run with one error listing what was
tried: a run never silently restarts from scratch. Temporary folders of saves that did not finish
(`<step>.orbax-checkpoint-tmp...`) are not progress: `remove_unfinished` deletes them at start. A save that runs out of disk space raises `DiskFullError`; Orbax deletes
old steps only after a new one is complete, so the earlier checkpoints stay intact.

Orbax reads a step with one TensorStore read per tensor, gathered in a fresh asyncio loop that it
closes as soon as the first read fails; the reads still in flight then answer the closed loop from
TensorStore's threads, and TensorStore reports each RuntimeError("Event loop is closed") as
unraisable, and asyncio logs each failed read whose task is collected unawaited ("Task exception
was never retrieved", as late as exit): a bare traceback on stderr each, none to dozens per damaged
step as the timing goes. `make_manager` makes the process drop exactly those reports, for good (a
read in flight may answer after the restore returned), so a damaged step reads as its one warning.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from derta_jax import storage

CHECKPOINT_DIR = "checkpoints"
UNREADABLE = "unreadable"
SUPERSEDED = "superseded"
TMP_MARK = ".orbax-checkpoint-tmp"

log = logging.getLogger(__name__)


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space (the earlier ones are intact)."""


class Unreadable(Exception):
    """A step that cannot be restored: damaged, incomplete, or holding non-finite values."""


# Orbax's coroutines that read the tensors of a step.
_READ_COROUTINES = ("async_deserialize", "_read_array_index_and_device_put")


def _late_read_report(report: Any) -> bool:
    """True for an unraisable report about a read of a step that already failed (nothing waits
    for it any more): a callback answering the asyncio loop Orbax closed after the first failed
    read, or one of Orbax's read coroutines raising its own read error as it is closed."""
    tb = report.exc_traceback
    if (report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
        return True
    code = getattr(report.object, "cr_code", None)
    return code is not None and code.co_name in _READ_COROUTINES


def _drop_late_read_reports() -> None:
    """Makes sys.unraisablehook drop the reports of `_late_read_report` and the asyncio log drop
    those of `_unretrieved_read` (once per process; every other report goes to the hook there
    was)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_late_read_reports", False):
        return

    def hook(report: Any) -> None:
        if not _late_read_report(report):
            previous(report)

    hook.drops_late_read_reports = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_unretrieved_read)


# What asyncio's "... exception was never retrieved" reports about a tensor read contain: Orbax's
# read coroutines, asyncio's wrapper around a TensorStore future (it names the tensorstore_spec),
# TensorStore's own read error and Orbax's (raised from a failed shard read and then held by the
# asyncio.gather of that tensor's shards, reported as a _GatheringFuture).
_TENSOR_READS = (*(f"coro=<{name}()" for name in _READ_COROUTINES), "tensorstore_spec=",
                 "Error reading ", "Encountered error while reading array index")
_UNRETRIEVED = tuple(f"{kind} exception was never retrieved"
                     for kind in ("Task", "Future", "_GatheringFuture"))


def _unretrieved_read(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's "Task/Future exception was never retrieved" about a tensor
    read of a step whose restore already failed: the other reads of that step fail too, and
    asyncio reports each one whenever its task or future is collected, as late as exit."""
    message = record.getMessage()
    return not (message.startswith(_UNRETRIEVED)
                and any(read in message for read in _TENSOR_READS))


def make_manager(workdir: str | epath.Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    _drop_late_read_reports()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(storage.path(workdir) / CHECKPOINT_DIR, options=options)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process (so all of them take the same branch)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def remove_unfinished(workdir: str | epath.Path) -> list[str]:
    """Deletes the temporary folders of saves that never finished (process 0), with a log line;
    returns their names."""
    folder = storage.path(workdir) / CHECKPOINT_DIR
    names = sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name) if folder.is_dir() else []
    if jax.process_index() == 0:
        for name in names:
            log.info("removing %s/%s: a save that did not finish is not progress", folder, name)
            with contextlib.suppress(OSError):
                (folder / name).rmtree()
    _sync("derta_jax:remove_unfinished")
    return names


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _raise_disk_full(mngr: ocp.CheckpointManager, e: BaseException) -> None:
    if not _disk_full(e):
        raise e
    kept = ", ".join(map(str, _finished_steps(mngr.directory))) or "none"
    raise DiskFullError(errno.ENOSPC, f"no space left on device while saving a checkpoint in "
                        f"{mngr.directory}; the finished checkpoints (steps {kept}) are intact: "
                        "free space and rerun to resume from the newest") from None


def _as_uint32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _checksum_leaves(tree: Any) -> Any:
    """Per leaf: sum over elements of bits(x) * (2 * flat index + 1), modulo 2**32. Any change of
    one element changes it (the weight is odd), as does moving values; one fused pass per leaf."""
    def one(x):
        index = sum((jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) *
                     np.uint32(int(np.prod(x.shape[d + 1:], dtype=np.int64)) % 2 ** 32)
                     for d in range(x.ndim)), jnp.zeros(x.shape, jnp.uint32))
        return jnp.sum(_as_uint32(x) * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
    return jax.tree.map(one, tree)


@functools.lru_cache(maxsize=None)
def _checksum_fn(out_sharding: Any) -> Any:
    return jax.jit(_checksum_leaves, out_shardings=out_sharding)


def checksums(state: Any) -> dict[str, int]:
    """{leaf name: checksum} of a train state (what a save writes and a restore compares)."""
    sharding = jax.tree.leaves(state)[0].sharding  # the sums replicated: every process reads them
    sums = jax.device_get(_checksum_fn(NamedSharding(sharding.mesh, P()) if isinstance(
        sharding, NamedSharding) else sharding)(state))
    return {_leaf_name(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def save(mngr: ocp.CheckpointManager, step: int, state: Any, loader: Any) -> None:
    """Saves `step` (in the background with async_save) with the state's checksums;
    DiskFullError when the disk is full."""
    try:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=grain.checkpoint.CheckpointSave(loader),
                                                checksum=ocp.args.JsonSave(checksums(state))),
                  force=True)
    except Exception as e:  # a background save's error surfaces at the next save
        _raise_disk_full(mngr, e)


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits for a background save; DiskFullError when it ran out of space."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        _raise_disk_full(mngr, e)


def _finished_steps(folder: epath.Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def newest_step(workdir: str | epath.Path) -> int | None:
    """The newest finished step in <workdir>/checkpoints (by name: not restored), or None."""
    steps = _finished_steps(storage.path(workdir) / CHECKPOINT_DIR)
    return steps[-1] if steps else None


def _leaf_name(path: tuple) -> str:
    """A pytree path as Orbax names the stored leaf (`opt_state.1.0.mu.layers_0.attn...`)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def _check_matches(item_dir: epath.Path, abstract_state: Any) -> None:
    """Unreadable when the stored tree's metadata cannot be read; ValueError (the config changed,
    the checkpoint is fine) when it holds other tensors than this config builds."""
    try:  # the files Orbax opens first, checked here so that it does not print tracebacks
        flags = json.loads((item_dir / "_METADATA").read_text())
        if flags.get("use_ocdbt") and not (item_dir / "manifest.ocdbt").is_file():
            raise FileNotFoundError(f"{item_dir / 'manifest.ocdbt'} is missing")
        tree = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    except Exception as e:  # Orbax raises many types
        raise Unreadable(f"its metadata cannot be read ({type(e).__name__}: {_short(e)})") from e
    stored = {m.name: m for m in jax.tree.leaves(tree) if hasattr(m, "shape")}
    wanted = {_leaf_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = [f"{n} is missing" for n in wanted if n not in stored]
    problems += [f"{n} is {list(stored[n].shape)} {np.dtype(stored[n].dtype)} there, "
                 f"{list(a.shape)} {np.dtype(a.dtype)} here" for n, a in wanted.items()
                 if n in stored and (tuple(stored[n].shape) != tuple(a.shape)
                                     or np.dtype(stored[n].dtype) != np.dtype(a.dtype))]
    problems += [f"{n} is not built by this config" for n in stored if n not in wanted]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"checkpoint {item_dir.parent} holds another train state than this config "
                         f"builds: {problems[0]}{more}; resume with the run's model and optimizer "
                         "config, or use another --workdir")


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


@jax.jit
def _finite_leaves(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else jnp.array(True), tree)


def first_nonfinite(state: Any) -> str | None:
    """The name of the first state leaf holding a NaN or an infinity, or None."""
    flags = jax.device_get(_finite_leaves(state))
    for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]:
        if not ok:
            return _leaf_name(path)
    return None


def restore(mngr: ocp.CheckpointManager, step: int, shardings: Any, abstract_state: Any,
            loader: Any) -> Any:
    """The state saved at `step`, placed on `shardings`; `loader` continues where it was saved.
    Raises Unreadable (with the reason) for a step that cannot be read completely or holds
    non-finite values, ValueError for one that holds another state than this config's."""
    path = mngr.directory / str(step)
    _check_matches(path / "state", abstract_state)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    items = {"state": ocp.args.StandardRestore(target),
             "data": grain.checkpoint.CheckpointRestore(loader)}
    if (path / "checksum").is_dir():
        items["checksum"] = ocp.args.JsonRestore()
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types; name the checkpoint in every case
        raise Unreadable(f"{type(e).__name__}: {_short(e)}") from e
    bad = first_nonfinite(restored["state"])
    if bad is not None:
        raise Unreadable(f"{bad} holds non-finite values")
    if "checksum" in items:
        saved, now = restored["checksum"], checksums(restored["state"])
        bad = next((n for n in now if saved.get(n) != now[n]), None)
        if bad is not None:
            raise Unreadable(f"{bad} does not match the checksum written with it (the stored "
                             "values changed after the save)")
    return restored["state"]


def _set_aside(folder: epath.Path, step: int, kind: str) -> epath.Path:
    """Renames checkpoints/<step> to checkpoints/<kind>-<step> (process 0; never deletes)."""
    _sync(f"derta_jax:before_set_aside_{step}")  # every process names the same target
    target = folder / f"{kind}-{step}"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{kind}-{step}.{n}"
    if jax.process_index() == 0:
        (folder / str(step)).rename(target)
    _sync(f"derta_jax:set_aside_{step}")
    return target


def _supersede(mngr: ocp.CheckpointManager, newer: list[int], step: int) -> None:
    """Sets the steps after an explicitly restored `step` aside, so the run continues from it."""
    folder = mngr.directory
    for n in newer:
        log.warning("checkpoint.restore_step=%d: moving the newer %s/%d to %s", step, folder, n,
                    _set_aside(folder, n, SUPERSEDED).name)
    mngr.reload()


def restore_newest(mngr: ocp.CheckpointManager, shardings: Any, abstract_state: Any, loader: Any,
                   step: int | None = None) -> tuple[int, Any] | None:
    """(step, state) of the newest step that reads completely (or of `step`); None for an empty
    folder. Steps that fail are set aside as unreadable-<step>; steps newer than an explicit
    `step` as superseded-<step>. ValueError when the folder holds something but nothing readable."""
    folder = mngr.directory
    steps = list(mngr.all_steps())
    if step is not None and step not in steps:
        raise ValueError(f"checkpoint.restore_step={step}: {folder} has no step {step} "
                         f"(steps: {', '.join(map(str, steps)) or 'none'})")
    tried = []
    for s in [step] if step is not None else reversed(steps):
        try:
            error = None
            state = restore(mngr, s, shardings, abstract_state, loader)
        except Unreadable as e:
            error = str(e)
        if everywhere(error is None):
            if step is not None:
                _supersede(mngr, [n for n in steps if n > step], step)
            return s, state
        error = error or "it cannot be read on another process"
        if step is not None:
            raise ValueError(f"checkpoint.restore_step={s}: {folder / str(s)} cannot be restored: "
                             f"{error}")
        moved = _set_aside(folder, s, UNREADABLE)
        log.warning("checkpoint %s/%d cannot be restored (%s): moved to %s; trying the one before",
                    folder, s, error, moved.name)
        tried.append(f"{folder / str(s)} ({error}; moved to {moved.name})")
    mngr.reload()
    if tried or (folder.exists() and any(folder.iterdir())):
        held = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) if folder.exists() else ""
        what = ("tried " + "; ".join(tried)) if tried else f"it holds {held}"
        raise ValueError(f"no readable checkpoint in {folder}: {what}. A run does not start over "
                         "where there was progress: repair a step (and move it back to "
                         "checkpoints/<step>), rename the folder to start over, or use another "
                         "--workdir")
    return None
