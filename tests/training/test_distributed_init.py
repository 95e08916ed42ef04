"""How derta_jax.train joins a multi-host run: explicit flags, SLURM, Cloud TPU, or alone."""
import jax
import pytest

from derta_jax.training import distributed


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: seen.append((a, k)))
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])  # no TPU on this machine
    return seen


def test_explicit_flags(calls):
    assert distributed.initialize("127.0.0.1:1234", 2, 1, env={}) == "explicit"
    assert calls == [(("127.0.0.1:1234",), {"num_processes": 2, "process_id": 1})]


def test_partial_flags_are_an_error(calls):
    with pytest.raises(ValueError, match="go together.*process_id=None"):
        distributed.initialize("127.0.0.1:1234", 2, None, env={})
    assert calls == []


def test_slurm_with_several_tasks_auto_initialises(calls):
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}
    assert distributed.initialize(None, None, None, env=env) == "slurm"
    assert calls == [((), {})]


def test_single_slurm_task_and_plain_machine_stay_single(calls):
    assert distributed.initialize(None, None, None, env={"SLURM_JOB_ID": "7",
                                                         "SLURM_NTASKS": "1"}) == "single process"
    assert distributed.initialize(None, None, None, env={}) == "single process"
    assert calls == []


def test_tpu_vm_auto_initialises(calls, monkeypatch):
    monkeypatch.setattr(distributed.glob, "glob",
                        lambda pattern: ["/dev/accel0"] if pattern == "/dev/accel*" else [])
    assert distributed.initialize(None, None, None, env={}) == "tpu"
    assert calls == [((), {})]
