"""The workdir's lock, config record and metrics log, and what the loop does with them before it
builds anything (so these tests need no compilation)."""
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from derta_jax.training import checkpointing as ckpt
from derta_jax.training import loop
from derta_jax.training import workdir as workdir_lib
from tests.training.run_helpers import tiny_config


def _lock(workdir, pid, host=None):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                              "start": "2026-12-01T10:00:00+00:00"}))


def test_a_second_trainer_refuses_while_the_first_is_alive(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, other.pid)
        with pytest.raises(ValueError, match=rf"in use by another trainer \(pid {other.pid} on "
                                             rf"host {socket.gethostname()}"):
            loop.train(tiny_config(steps=2), tmp_path)
        assert json.loads((tmp_path / "lock").read_text())["pid"] == other.pid  # left alone
        assert not (tmp_path / "checkpoints").exists()
    finally:
        other.kill()
        other.wait()


def test_a_lock_on_another_host_is_not_taken(tmp_path):
    _lock(tmp_path, 1, host="some-other-host")
    with pytest.raises(ValueError, match="pid 1 on host some-other-host"):
        workdir_lib.acquire_lock(tmp_path)


def test_a_stale_lock_is_taken_over_with_a_warning_and_released(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(tmp_path, dead.pid)
    with caplog.at_level(logging.WARNING, "derta_jax"):
        with workdir_lib.hold_lock(tmp_path):
            held = json.loads((tmp_path / "lock").read_text())
            assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
            assert held["start"]
    assert f"pid {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / "lock").exists()


def _progress(workdir, config):
    """A workdir as a run of `config` leaves it after a checkpoint (its folder is all that the
    config check looks at)."""
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json(indent=2))


def test_a_changed_config_is_refused_listing_the_keys_and_config_json_is_kept(tmp_path):
    _progress(tmp_path, tiny_config(steps=4))
    before = (tmp_path / "config.json").read_text()
    changed = tiny_config(steps=4, optimizer__learning_rate=0.02, data__seed=3,
                          train__batch_size=8, data__max_length=32)
    with pytest.raises(ValueError) as e:
        loop.train(changed, tmp_path)
    for key in ("optimizer.learning_rate (0.01 -> 0.02)", "data.seed (0 -> 3)",
                "train.batch_size (4 -> 8)", "data.max_length (64 -> 32)",
                "train.allow_config_change=True"):
        assert key in str(e.value)
    assert (tmp_path / "config.json").read_text() == before
    assert not (tmp_path / "lock").exists()


def test_keys_that_do_not_change_the_run_are_allowed(tmp_path):
    _progress(tmp_path, tiny_config(steps=4))
    allowed = tiny_config(steps=40, train__log_every=5, checkpoint__every_steps=7,
                          checkpoint__keep=9, checkpoint__async_save=True, train__stop_at=20,
                          train__peak_tflops=2.0, train__on_nonfinite="skip",
                          train__max_skipped_steps=3, checkpoint__restore_step=2)
    assert len(workdir_lib.check_config(allowed, tmp_path, allow=False)) == 10
    forced = tiny_config(steps=4, optimizer__learning_rate=0.02, train__allow_config_change=True)
    assert set(workdir_lib.check_config(forced, tmp_path, allow=True)) == {
        "optimizer.learning_rate", "train.allow_config_change"}


def test_a_key_the_recorded_config_lacks_counts_as_its_default(tmp_path):
    config = tiny_config(steps=4)
    _progress(tmp_path, config)
    recorded = json.loads((tmp_path / "config.json").read_text())
    del recorded["train"]["on_nonfinite"]  # written by a version without the key
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    assert workdir_lib.config_changes(config, tmp_path) == {}
    assert list(workdir_lib.config_changes(tiny_config(4, train__on_nonfinite="skip"),
                                           tmp_path)) == ["train.on_nonfinite"]


def test_a_changed_config_keeps_the_previous_file(tmp_path):
    first, second = tiny_config(steps=4), tiny_config(steps=8)
    workdir_lib.record_config(first, tmp_path, 0, changed=False)
    workdir_lib.record_config(second, tmp_path, 4, changed=True)
    workdir_lib.record_config(tiny_config(steps=9), tmp_path, 4, changed=True)
    assert json.loads((tmp_path / "config.4.json").read_text())["train"]["steps"] == 4
    assert json.loads((tmp_path / "config.4.2.json").read_text())["train"]["steps"] == 8
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 9


def test_rows_after_the_restored_step_and_a_torn_line_are_dropped(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "lo')
    assert workdir_lib.truncate_metrics(tmp_path, 3) == 3
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    assert workdir_lib.truncate_metrics(tmp_path, 3) == 0


def test_non_finite_metrics_are_written_as_null():
    row = workdir_lib.json_row(3, {"loss": float("nan"), "norm/grad": float("inf"), "lr": 0.5})
    assert json.loads(row) == {"step": 3, "loss": None, "norm/grad": None, "lr": 0.5}


def test_unfinished_saves_are_removed_and_are_not_progress(tmp_path, caplog):
    """A kill (or a full disk) during the first save leaves only a temporary folder: the next
    start removes it and starts from scratch instead of refusing."""
    folder = tmp_path / "checkpoints"
    (folder / "2.orbax-checkpoint-tmp-1733000000" / "state").mkdir(parents=True)
    (folder / "4.orbax-checkpoint-tmp").mkdir()
    with caplog.at_level(logging.INFO, "derta_jax"):
        assert ckpt.remove_unfinished(tmp_path) == ["2.orbax-checkpoint-tmp-1733000000",
                                                    "4.orbax-checkpoint-tmp"]
    assert "2.orbax-checkpoint-tmp-1733000000: a save that did not finish" in caplog.text
    mngr = ckpt.make_manager(tmp_path, keep=2, async_save=False)
    try:
        assert ckpt.restore_newest(mngr, None, None, None) is None
    finally:
        mngr.close()


def test_garbage_in_the_checkpoints_folder_is_not_silently_restarted(tmp_path):
    (tmp_path / "checkpoints" / "garbage").mkdir(parents=True)
    mngr = ckpt.make_manager(tmp_path, keep=2, async_save=False)
    try:
        with pytest.raises(ValueError, match="no readable checkpoint .* it holds garbage"):
            ckpt.restore_newest(mngr, None, None, None)
    finally:
        mngr.close()
