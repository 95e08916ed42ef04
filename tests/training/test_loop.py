"""The training loop on the tiny config: exact resume, learning, errors that name their cause.
Non-finite steps, damaged checkpoints, full disks and kills: test_recovery.py, test_faults.py."""
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from derta_jax.training import loop
from derta_jax.training.config import validate
from tests.training.run_helpers import read_metrics, tiny_config


def final_params(workdir: pathlib.Path, step: int):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")["params"]


def test_three_steps_stop_resume_three_equal_six_straight(tmp_path, llama3_tokenizer_dir):
    config = tiny_config(steps=6)
    loop.train(config, tmp_path / "straight")
    config.train.stop_at = 3
    loop.train(config, tmp_path / "resumed")
    assert len(read_metrics(tmp_path / "resumed")) == 3
    config.train.stop_at = -1
    loop.train(config, tmp_path / "resumed")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
               {k: v for k, v in b.items() if not k.startswith("perf/")}
    want, got = final_params(tmp_path / "straight", 6), final_params(tmp_path / "resumed", 6)
    jax.tree.map(np.testing.assert_array_equal, want, got)
    assert (tmp_path / "straight" / "model" / "model_config.json").exists()
    assert (tmp_path / "straight" / "model" / "tokenizer.json").exists()
    assert list((tmp_path / "straight" / "tensorboard").iterdir())

    # A checkpoint that cannot be read is set aside; with none left the run stops and names it
    # (a longer run: a finished one has nothing to do and reads nothing).
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "resumed", broken)
    shutil.rmtree(broken / "checkpoints" / "3")
    shutil.rmtree(broken / "checkpoints" / "6" / "state")
    config.train.steps = 8
    with pytest.raises(ValueError, match=r"no readable checkpoint .* tried .*checkpoints/6 \(.*; "
                                         r"moved to unreadable-6\)"):
        loop.train(config, broken)
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["unreadable-6"]


def test_tiny_config_lowers_mle_and_rto_losses(tmp_path, llama3_tokenizer_dir):
    loop.train(tiny_config(steps=24), tmp_path)
    metrics = read_metrics(tmp_path)
    for key in ("loss/mle", "loss/rto"):
        first = np.mean([m[key] for m in metrics[:4]])
        last = np.mean([m[key] for m in metrics[-4:]])
        assert last < first - 2.0, (key, first, last)


def test_a_folder_without_checkpoints_is_not_silently_restarted(tmp_path, llama3_tokenizer_dir):
    (tmp_path / "checkpoints" / "garbage").mkdir(parents=True)
    with pytest.raises(ValueError, match="no readable checkpoint"):
        loop.train(tiny_config(steps=2), tmp_path)


@pytest.mark.parametrize("key,value,match", [
    ("loss.rto_keep", 0.0, r"loss.rto_keep=0.0"),
    ("data.recipe", "derta2", r"data.recipe='derta2'"),
    ("train.accum_steps", 0, r"train.accum_steps=0"),
    ("model.init", "zeros", r"model.init='zeros'"),
    ("optimizer.schedule", "exponential", r"optimizer.schedule='exponential'"),
    ("model.dtype", "float16", r"model.dtype='float16'"),
    ("loss.rto_keep_rule", "most", r"loss.rto_keep_rule='most'"),
])
def test_validate_names_the_key_and_value(key, value, match):
    config = tiny_config(steps=2)
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=match):
        validate(config)


def test_sigterm_saves_and_stops(tmp_path, llama3_tokenizer_dir, monkeypatch):
    import os
    import signal
    calls = []
    shard = loop.shd.shard_batch

    def shard_and_preempt(batch, mesh):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return shard(batch, mesh)

    monkeypatch.setattr(loop.shd, "shard_batch", shard_and_preempt)
    loop.train(tiny_config(steps=6), tmp_path)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
