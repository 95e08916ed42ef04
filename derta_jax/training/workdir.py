"""What a training workdir holds besides checkpoints: the lock, the config record, the metrics log.

    with hold_lock(workdir): ...                    # <workdir>/lock: pid, host, start time
    changed = config_changes(config, workdir)       # keys that differ from <workdir>/config.json
    record_config(config, workdir, step)            # config.json (previous one kept as config.<step>.json)
    truncate_metrics(workdir, step)                 # rows after the restored step are dropped
    wandb_run = open_wandb(config, workdir)         # W&B run (train.wandb_project) or None

One trainer per workdir: a second one refuses while the lock's process is alive; a lock left by
a dead process on this host is taken over with a warning (one on another host cannot be checked:
the message says to delete it). Only process 0 takes the lock and writes these files.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import socket
import uuid
from typing import Any, Iterator

import jax
import ml_collections
from etils import epath

from derta_jax import storage
from derta_jax.training import checkpointing as ckpt
from derta_jax.training import config as config_lib

LOCK_FILE = "lock"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"

# Keys that do not change the steps a run takes, so a resumed run may change them. train.steps
# and train.epochs set where the run ends (a non-constant schedule is laid over the new total).
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.epochs", "train.log_every", "train.peak_tflops", "train.stop_at",
    "train.on_nonfinite", "train.max_skipped_steps", "train.allow_config_change",
    "train.wandb_project", "train.wandb_run",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
    "checkpoint.restore_step"})

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_lock(path: epath.Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # a lock being written, or garbage: treated as held by an unknown process


def _take(path: epath.Path) -> bool:
    """Creates the lock file atomically; False when it exists."""
    return storage.create_new(path, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}))


def acquire_lock(workdir: epath.Path) -> epath.Path | None:
    """Takes <workdir>/lock on process 0 (None elsewhere); ValueError while another trainer holds
    it; a stale lock (its pid dead on this host) is taken over with a warning."""
    if jax.process_index() != 0:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    for _ in range(3):  # a lock removed between our attempts is retried
        if _take(path):
            return path
        holder = _read_lock(path)
        pid, host = holder.get("pid"), holder.get("host")
        what = (f"pid {pid} on host {host} since {holder.get('start', '?')}" if pid
                else "an unknown process (unreadable lock file)")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            log.warning("taking over %s: it was held by %s, which is no longer running", path, what)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if host == socket.gethostname() and pid == os.getpid():
            what = "this process (a train() call that is still running)"
        raise ValueError(f"{workdir} is in use by another trainer ({what}, see {path}); wait for "
                         "it to finish or use another --workdir; if that process is gone, delete "
                         f"{path}")
    raise ValueError(f"cannot take {path}: it keeps being re-created by another trainer")


def release_lock(path: epath.Path | None) -> None:
    if path is None:
        return
    holder = _read_lock(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold_lock(workdir: epath.Path) -> Iterator[None]:
    """The lock held while the body runs; every process raises when process 0 cannot take it."""
    error, path = None, None
    try:
        path = acquire_lock(workdir)
    except ValueError as e:
        error = e
    if not ckpt.everywhere(error is None):
        raise error or ValueError(f"{workdir} is in use by another trainer (process 0 could not "
                                  f"take {workdir / LOCK_FILE})")
    try:
        yield
    finally:
        release_lock(path)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(config: ml_collections.ConfigDict, workdir: epath.Path
                   ) -> dict[str, tuple[Any, Any]]:
    """`key: (recorded, new)` for every key whose value differs from <workdir>/config.json (a
    key the recorded config lacks, from an older version, counts as its default)."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        old = _flat(json.loads(path.read_text()))
    except ValueError as e:
        raise ValueError(f"{path} is not JSON ({e}); restore it or use another --workdir") from None
    new = _flat(json.loads(config.to_json()))
    default = _flat(json.loads(config_lib.base_config().to_json()))
    return {k: (old.get(k, default.get(k)), v) for k, v in sorted(new.items())
            if old.get(k, default.get(k)) != v}


def check_config(config: ml_collections.ConfigDict, workdir: epath.Path, allow: bool
                 ) -> dict[str, tuple[Any, Any]]:
    """The changed keys; ValueError listing the ones that change the run unless `allow`."""
    changed = config_changes(config, workdir)
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_KEYS}
    if refused and not allow:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
        raise ValueError(f"{workdir} holds a run with another config: {listed} would change the run "
                         f"(see {workdir / CONFIG_FILE}); resume with the same values, pass "
                         "--config.train.allow_config_change=True to continue anyway, or use "
                         "another --workdir")
    if refused:
        log.warning("train.allow_config_change: resuming with changed keys %s", ", ".join(refused))
    return changed


def record_config(config: ml_collections.ConfigDict, workdir: epath.Path, step: int,
                  changed: bool) -> None:
    """Writes config.json (process 0); a changed one keeps the previous as config.<step>.json."""
    if jax.process_index() != 0:
        return
    path = workdir / CONFIG_FILE
    if changed and path.exists():
        kept, n = workdir / f"config.{step}.json", 1
        while kept.exists():
            n += 1
            kept = workdir / f"config.{step}.{n}.json"
        storage.write_whole(kept, path.read_text())
        log.info("config changed at step %d: the previous one is kept as %s", step, kept.name)
    storage.write_whole(path, config.to_json(indent=2))


def truncate_metrics(workdir: epath.Path, step: int) -> int:
    """Drops metrics.jsonl rows after `step` (and a torn last line) so that a resumed run writes
    every step exactly once; returns how many rows were dropped (process 0)."""
    path = workdir / METRICS_FILE
    if jax.process_index() != 0 or not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut by a kill
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        storage.write_whole(path, "".join(line + "\n" for line in kept))
        log.info("%s: dropped %d rows after step %d (written after the checkpoint)", path, dropped,
                 step)
    return dropped


def json_row(step: int, metrics: dict[str, float]) -> str:
    """A metrics.jsonl line; non-finite values are written as null (valid JSON)."""
    return json.dumps({"step": step,
                       **{k: v if math.isfinite(v) else None for k, v in metrics.items()}})


def wandb_mode() -> str:
    """$WANDB_MODE when set, else online with a $WANDB_API_KEY and offline without one."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                            else "offline")


def open_wandb(config: ml_collections.ConfigDict, workdir: epath.Path) -> Any:
    """The W&B run of train.wandb_project (None when ''), files under $WANDB_DIR or the workdir
    (W&B's default ./wandb for a bucket workdir).
    Its id is kept in <workdir>/wandb_id, so a resumed run continues the same W&B run (W&B
    ignores rows for steps it already has). Process 0 only; wandb is imported only here."""
    t = config.train
    if not t.wandb_project or jax.process_index() != 0:
        return None
    import wandb
    id_path = workdir / WANDB_ID_FILE
    if not id_path.exists():
        id_path.write_text(uuid.uuid4().hex[:8])
    mode = wandb_mode()
    local_dir = None if storage.is_url(workdir) else str(workdir)  # W&B writes local files only
    log.info("W&B: project %s, %s mode, run id %s", t.wandb_project, mode, id_path.read_text())
    return wandb.init(project=t.wandb_project, name=t.wandb_run or None, id=id_path.read_text(),
                      resume="allow", mode=mode, dir=os.environ.get("WANDB_DIR") or local_dir,
                      config=config.to_dict())
