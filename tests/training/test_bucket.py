"""Training with everything in a (fake) gs:// bucket: the data files, data.data_dir and the workdir.
A run stopped and resumed in the bucket equals a straight local run, step for step."""
import json
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from derta_jax import storage
from derta_jax.data import pipeline, prepared
from derta_jax.training import loop
from derta_jax.training import workdir as workdir_lib
from tests.training.run_helpers import read_metrics, tiny_config


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in storage.path(path).read_text().splitlines()]


def _without_perf(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.fixture()
def prefix(bucket) -> str:
    return f"{bucket}/train-tests/{uuid.uuid4().hex[:8]}"


def test_stop_and_resume_in_a_bucket_equal_a_straight_local_run(tmp_path, prefix,
                                                                 llama3_tokenizer_dir):
    config = tiny_config(steps=6)
    loop.train(config, tmp_path / "straight")

    for kind in ("safety", "helpful"):  # the sources in the bucket too
        storage.upload(pipeline.DEMO_DIR / f"{kind}.jsonl", f"{prefix}/data/{kind}.jsonl")
        config.data[kind] = f"{prefix}/data/{kind}.jsonl"
    config.data.data_dir = f"{prefix}/prepared"
    workdir = f"{prefix}/run"
    config.train.stop_at = 3
    loop.train(config, workdir)
    assert [r["step"] for r in _rows(f"{workdir}/metrics.jsonl")] == [1, 2, 3]
    config.train.stop_at = -1
    loop.train(config, workdir)

    local, remote = read_metrics(tmp_path / "straight"), _rows(f"{workdir}/metrics.jsonl")
    assert [r["step"] for r in remote] == list(range(1, 7))
    assert _without_perf(local) == _without_perf(remote)
    run = storage.path(workdir)
    want = ocp.StandardCheckpointer().restore(tmp_path / "straight/checkpoints/6/state")["params"]
    got = ocp.StandardCheckpointer().restore(run / "checkpoints/6/state")["params"]
    jax.tree.map(np.testing.assert_array_equal, want, got)
    for name in ("config.json", "plan.json", "model/model_config.json", "model/tokenizer.json"):
        assert (run / name).exists(), name
    assert storage.files(run / "tensorboard")  # tensorboardX writes gs:// itself
    assert not (run / workdir_lib.LOCK_FILE).exists()  # released
    # The examples were prepared once, in the bucket, complete (its log last).
    folders = storage.path(f"{prefix}/prepared/{prepared.SUBDIR}").iterdir()
    assert sorted(p.name for p in storage.files(next(folders))) == \
        sorted([prepared.RECORDS, prepared.INDEX, prepared.LOG])
    # Nothing was written under a local folder named after the URL (gs:/... from pathlib).
    assert not any(p.name == "gs:" for p in tmp_path.iterdir())


def test_the_lock_in_a_bucket_refuses_a_second_trainer(prefix):
    workdir = storage.path(f"{prefix}/locked")
    with workdir_lib.hold_lock(workdir):
        with pytest.raises(ValueError, match=r"is in use by another trainer .*this process"):
            workdir_lib.acquire_lock(workdir)
    assert not (workdir / workdir_lib.LOCK_FILE).exists()
    with workdir_lib.hold_lock(workdir):  # free again
        pass
