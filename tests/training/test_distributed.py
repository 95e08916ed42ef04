"""A 2-process jax.distributed run (gloo on 127.0.0.1) equals the 1-process run, via the CLI."""
import os
import socket
import subprocess
import sys

import numpy as np

from tests.training.run_helpers import ROOT, read_metrics

OVERRIDES = ["--config=configs/tiny.py", "--config.train.steps=2", "--config.train.batch_size=4",
             "--config.data.max_length=64", "--config.data.helpful_count=32",
             "--config.data.rto_count=16", "--config.data.prefix_count=16",
             "--config.checkpoint.async_save=False"]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(ROOT)
    return env


def _train(workdir, devices: int, extra=()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "derta_jax.train", *OVERRIDES,
                             f"--workdir={workdir}", *extra], cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def test_two_processes_equal_one(tmp_path, llama3_tokenizer_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multi = [_train(tmp_path / "two", 2, ["--coordinator", f"127.0.0.1:{port}",
                                          "--num-processes", "2", "--process-id", str(i)])
             for i in (0, 1)]
    for proc in multi:
        _wait(proc)
    _wait(_train(tmp_path / "one", 4))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two):
        for key in ("loss", "loss/mle", "loss/rto", "norm/grad", "tokens/mle", "tokens/rto"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    assert (tmp_path / "two" / "checkpoints" / "2").exists()
