"""A damaged latest step falls back with one warning and nothing else on stderr (issue 13): Orbax
gathers one TensorStore read per tensor in a fresh asyncio loop and closes it at the first failed
read; the reads still in flight answer the closed loop and TensorStore reported each as a bare
traceback (checkpointing._drop_late_read_reports)."""
import asyncio
import re
import subprocess
import sys
import types

import pytest
import tensorstore as ts

from benchmarks import faults
from derta_jax.training import checkpointing as ckpt

# Copies of the base run (checkpoints 2 and 4), step 4 damaged, each restored as a 6-step run.
# Whether reads are still in flight when Orbax closes its loop is a race; a longer GIL switch
# interval makes it happen in about half the attempts (one in three with the default).
RESTORES = """
import pathlib, shutil, sys
from benchmarks import faults
from derta_jax.training import loop
from tests.training.conftest import BASE
from tests.training.run_helpers import tiny_config
sys.setswitchinterval(0.05)
base, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for i, damage in enumerate(sys.argv[3:]):
    work = out / str(i)
    shutil.copytree(base, work)
    faults.DAMAGES[damage](work / "checkpoints" / "4")
    with faults.stop_before_the_first_step() as run:
        loop.train(tiny_config(6, **BASE), work)
    print(run["start"], flush=True)
"""
DAMAGES = ["truncate state/manifest.ocdbt", "delete every tensor file", "delete the largest tensor file"] * 2


def test_a_damaged_step_is_one_warning_and_nothing_else_on_stderr(base_run, compile_cache,
                                                                 tmp_path):
    proc = subprocess.run([sys.executable, "-c", RESTORES, str(base_run), str(tmp_path), *DAMAGES],
                          cwd=faults.ROOT, env=faults.train_env(compile_cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2"] * len(DAMAGES)
    assert "Traceback" not in proc.stderr and "never retrieved" not in proc.stderr, proc.stderr
    lines = [line for line in re.split(r"[\r\n]+", proc.stderr)
             if line.strip() and not line.startswith("train:")]  # the progress bar
    assert len(lines) == len(DAMAGES), proc.stderr
    for i, line in enumerate(lines):
        assert re.fullmatch(rf"WARNING:derta_jax\.training\.checkpointing:checkpoint "
                            rf"{re.escape(str(tmp_path))}/{i}/checkpoints/4 cannot be restored "
                            r"\(.+\): moved to unreadable-4; trying the one before", line), line


def test_only_reads_answering_a_closed_loop_are_dropped(tmp_path, monkeypatch):
    """Orbax's read, reduced: two reads gathered in a fresh loop, closed once the first fails;
    the second answers the closed loop. Other unraisable errors still reach the hook."""
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    ckpt.make_manager(tmp_path, keep=1, async_save=False).close()
    (first_read, first), (second_read, second) = ts.Promise.new(), ts.Promise.new()

    async def read():
        return await asyncio.gather(first, second)

    loop = asyncio.new_event_loop()
    first_read.set_exception(ValueError("damaged"))
    with pytest.raises(ValueError, match="damaged"):
        loop.run_until_complete(read())
    loop.close()
    second_read.set_exception(ValueError("damaged too"))  # its callback meets the closed loop
    assert reports == []

    def callback(future):
        raise RuntimeError("Event loop is closed")  # the same error, from elsewhere

    other_read, other = ts.Promise.new()
    other.add_done_callback(callback)
    other_read.set_result(None)
    assert [(r.exc_type, str(r.exc_value)) for r in reports] == [
        (RuntimeError, "Event loop is closed")]


@types.coroutine
def _suspend():
    yield


async def _read_array_index_and_device_put():  # named as Orbax's read of one shard
    try:
        await _suspend()
    finally:
        raise Exception("Encountered error while reading array index")  # noqa: B012


async def other_coroutine():
    try:
        await _suspend()
    finally:
        raise Exception("an error someone must see")  # noqa: B012


def test_a_read_coroutine_closed_with_its_error_is_dropped(tmp_path, monkeypatch):
    """After a deleted tensor file, Orbax's shard reads still suspended are closed when collected
    and raise their read error: reported as "Exception ignored in: <coroutine object
    _read_array_index_and_device_put>". Those are dropped, any other coroutine's kept."""
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    ckpt.make_manager(tmp_path, keep=1, async_save=False).close()
    for make in (_read_array_index_and_device_put, other_coroutine):
        coroutine = make()
        coroutine.send(None)
        del coroutine  # closed: its finally raises
    assert [str(r.exc_value) for r in reports] == ["an error someone must see"]
