"""Resuming copies of one tiny run (conftest.base_run: checkpoints at 2 and 4) after what issue 13
reproduced: a damaged latest step, a full disk, a diverging step. The restore cases stop before
the first step (faults.stop_before_the_first_step), so they cost a restore, not a compilation."""
import errno
import gc
import json
import logging
import os
import re
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from benchmarks import faults
from derta_jax.data import loader as loader_lib
from derta_jax.training import checkpointing as ckpt
from derta_jax.training import loop
from tests.training.conftest import BASE
from tests.training.helpers import loop_rng, poison_grads
from tests.training.run_helpers import read_metrics, tiny_config


def _state(workdir, step):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _names(workdir):
    return sorted(os.listdir(workdir / "checkpoints"))


@pytest.mark.parametrize("damage", ["delete state/", "truncate the largest tensor file",
                                    "truncate state/_METADATA", "delete the data iterator file"])
def test_a_damaged_latest_step_is_set_aside_and_the_one_before_wins(base_copy, damage, caplog):
    faults.DAMAGES[damage](base_copy / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, "derta_jax"), faults.stop_before_the_first_step() as run:
        loop.train(tiny_config(6, **BASE), base_copy)
    assert run["start"] == 2
    assert re.search(r"checkpoints/4 cannot be restored \(.+\): moved to unreadable-4",
                     caplog.text), caplog.text
    assert _names(base_copy) == ["2", "unreadable-4"]
    assert [r["step"] for r in read_metrics(base_copy)] == [1, 2]


def test_values_changed_after_the_save_fail_the_checksum_and_the_one_before_wins(base_copy,
                                                                                caplog):
    """Step 4's state rewritten as a valid checkpoint holding one other value (what flipped bytes
    that still decode amount to): its checksum no longer matches, so step 2 wins. A step saved
    without checksums (before they existed) is restored unchecked."""
    step4 = base_copy / "checkpoints" / "4"
    state = _state(base_copy, 4)
    scale = state["params"]["final_norm"]["scale"]
    state["params"]["final_norm"]["scale"] = scale.at[3].add(1.0)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(base_copy / "other", state)
        checkpointer.wait_until_finished()
    os.rename(step4 / "state", base_copy / "state-4")
    os.rename(base_copy / "other", step4 / "state")
    with caplog.at_level(logging.WARNING, "derta_jax"), faults.stop_before_the_first_step() as run:
        loop.train(tiny_config(6, **BASE), base_copy)
    assert run["start"] == 2
    assert re.search(r"checkpoints/4 cannot be restored \(params\.final_norm\.scale does not "
                     r"match the checksum written with it", caplog.text), caplog.text
    os.rename(base_copy / "checkpoints" / "unreadable-4", step4)
    os.rename(step4 / "state", base_copy / "changed-4")
    os.rename(base_copy / "state-4", step4 / "state")
    shutil.rmtree(step4 / "checksum")
    with faults.stop_before_the_first_step() as run:
        loop.train(tiny_config(6, **BASE), base_copy)
    assert run["start"] == 4


def test_checksums_change_with_any_element_of_any_dtype_and_with_moved_values():
    import jax.numpy as jnp
    tree = {"f32": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
            "bf16": jnp.linspace(-1, 1, 10, dtype=jnp.bfloat16), "int": jnp.arange(5),
            "u32": jnp.array([1, 2], jnp.uint32), "bool": jnp.array([True, False, True]),
            "scalar": jnp.float32(2.5)}
    base = ckpt.checksums(tree)
    assert base == ckpt.checksums(jax.tree.map(jnp.copy, tree))
    for name, x in tree.items():
        flat = x.reshape(-1)
        for i in range(flat.size):
            changed = flat.at[i].set(~flat[i] if x.dtype == jnp.bool_ else
                                     flat[i] + (1 if jnp.issubdtype(x.dtype, jnp.integer)
                                                else 0.5))
            sums = ckpt.checksums({**tree, name: changed.reshape(x.shape)})
            assert sums[name] != base[name], (name, i)
            assert {k: v for k, v in sums.items() if k != name} == \
                {k: v for k, v in base.items() if k != name}
    swapped = tree["f32"].at[0, 0].set(tree["f32"][2, 3]).at[2, 3].set(tree["f32"][0, 0])
    assert ckpt.checksums({**tree, "f32": swapped})["f32"] != base["f32"]


def test_a_finished_run_has_nothing_to_do_and_is_left_alone(base_copy, caplog):
    """Decided from the folder: restoring step 4 into a 2-step plan would fail (its data
    iterator is past the end) and must not set it aside."""
    before = (base_copy / "config.json").read_text()
    with caplog.at_level(logging.INFO, "derta_jax"):
        assert loop.train(tiny_config(2, **BASE), base_copy) == {}
        assert loop.train(tiny_config(4, **BASE), base_copy) == {}
    assert "already at step 4 >= train.steps=2: nothing to do" in caplog.text
    assert "already at step 4 >= train.steps=4: nothing to do" in caplog.text
    assert _names(base_copy) == ["2", "4"]
    assert (base_copy / "config.json").read_text() == before
    assert [r["step"] for r in read_metrics(base_copy)] == [1, 2, 3, 4]


def test_restore_step_picks_a_step_and_sets_the_newer_ones_aside(base_copy):
    with pytest.raises(ValueError, match=r"checkpoint.restore_step=3: .* has no step 3 "
                                         r"\(steps: 2, 4\)"):
        loop.train(tiny_config(6, checkpoint__restore_step=3, **BASE), base_copy)
    with faults.stop_before_the_first_step() as run:
        loop.train(tiny_config(6, checkpoint__restore_step=2, **BASE), base_copy)
    assert run["start"] == 2
    assert _names(base_copy) == ["2", "superseded-4"]
    assert [r["step"] for r in read_metrics(base_copy)] == [1, 2]


def test_no_readable_step_stops_listing_what_it_tried_and_never_starts_over(base_copy):
    for step in (2, 4):
        faults.DAMAGES["delete the largest tensor file"](base_copy / "checkpoints" / str(step))
    with pytest.raises(ValueError) as e:
        loop.train(tiny_config(6, **BASE), base_copy)
    message = str(e.value)
    assert message.startswith("no readable checkpoint in ") and "tried " in message
    assert "checkpoints/4 (" in message and "moved to unreadable-4" in message
    assert "checkpoints/2 (" in message and "moved to unreadable-2" in message
    assert _names(base_copy) == ["unreadable-2", "unreadable-4"]
    with pytest.raises(ValueError, match="no readable checkpoint .* it holds unreadable-2, "
                                         "unreadable-4"):
        loop.train(tiny_config(6, **BASE), base_copy)


def test_a_full_disk_stops_with_one_message_and_the_earlier_checkpoints_stay(base_copy,
                                                                             monkeypatch):
    def no_space(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", no_space)
    with pytest.raises(ckpt.DiskFullError, match=r"no space left on device while saving a "
                                                 r"checkpoint in .*; the finished checkpoints "
                                                 r"\(steps 2, 4\) are intact"):
        loop.train(tiny_config(6, **BASE), base_copy)
    assert [r["step"] for r in read_metrics(base_copy)] == [1, 2, 3, 4, 5, 6]  # 6 before its save
    monkeypatch.undo()
    assert [n for n in _names(base_copy) if ckpt.TMP_MARK not in n] == ["2", "4"]
    with faults.stop_before_the_first_step() as run:  # the unfinished save is removed, 4 reads
        loop.train(tiny_config(6, **BASE), base_copy)
    assert run["start"] == 4 and _names(base_copy) == ["2", "4"]


def test_a_diverging_step_is_never_saved_then_skip_continues(base_copy, monkeypatch):
    """Step 5's gradient is NaN while its loss is finite (issue 13's case). stop: the run stops
    naming the step and its examples, with no checkpoint of it and valid JSON rows. skip (an
    allowed config change): step 5's update is not applied and counted, two non-finite steps in
    a row (7, 8) stop the run, and every saved state is finite."""
    poison_grads(monkeypatch, [loop_rng(0, s) for s in (5, 7, 8)])
    with pytest.raises(loop.Diverged) as e:
        loop.train(tiny_config(6, **{**BASE, "checkpoint__every_steps": 1}), base_copy)
    examples = loader_lib.step_examples(64, 4, 0, 4)[0]
    assert "step 5 is not finite (loss=1" in str(e.value) and "norm/grad=nan" in str(e.value)
    assert f"examples {', '.join(map(str, examples))} (indices" in str(e.value)
    assert "the last checkpoint is step 4" in str(e.value)
    assert _names(base_copy) == ["2", "4"]
    rows = read_metrics(base_copy)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["norm/grad"] is None

    with pytest.raises(loop.Diverged, match=r"2 steps in a row were not finite \(steps 7..8, "
                                            r"train.max_skipped_steps=2\)"):
        loop.train(tiny_config(8, train__on_nonfinite="skip", train__max_skipped_steps=2,
                               **BASE), base_copy)
    rows = read_metrics(base_copy)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["train/skipped_steps"] for r in rows[4:]] == [1, 1, 2, 3]
    assert _names(base_copy) == ["2", "4", "6"]
    six = _state(base_copy, 6)
    assert int(six["step"]) == 5  # one of the 6 steps was skipped
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(six) if x.dtype.kind == "f")
    assert json.loads((base_copy / "config.4.json").read_text())["train"]["on_nonfinite"] == "stop"
    assert not (base_copy / "lock").exists()


def test_eval_and_export_resolve_the_newest_readable_step_and_refuse_non_finite_tensors(
        base_copy, caplog):
    """checkpoints/resolve.py (what eval, generate and export read): a latest step without its
    state is skipped with a warning naming it (it used to be skipped silently), and a tensor
    holding NaN is refused, naming it."""
    from derta_jax.checkpoints.resolve import resolve_checkpoint
    faults.DAMAGES["delete state/"](base_copy / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, "derta_jax"):
        assert resolve_checkpoint(base_copy).step == 2
    assert re.search(r"skipping checkpoint .*/checkpoints/4: .*not a readable", caplog.text)
    state = jax.tree.map(np.array, _state(base_copy, 2))  # writable host copies
    state["params"]["layers_1"]["mlp"]["up_proj"]["kernel"][0, 0] = np.nan
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(base_copy / "checkpoints" / "6" / "state", state)
    ckpt_6 = resolve_checkpoint(base_copy)
    assert ckpt_6.step == 6
    ckpt_6.read_param(("layers_0", "mlp", "up_proj", "kernel"))
    with pytest.raises(ValueError, match=r"checkpoints/6/state holds non-finite values in "
                                         r"params/layers_1/mlp/up_proj/kernel"):
        ckpt_6.params_tree()


@pytest.mark.parametrize("damage", ["truncate state/manifest.ocdbt",
                                    "zero the largest tensor file"])
def test_an_unreadable_step_is_one_warning_not_storage_tracebacks(base_copy, caplog, damage):
    """One warning line naming the step, and no storage-layer traceback logged at any level (also
    after a garbage collection; the reports asyncio makes then are tested deterministically in
    test_unretrieved_failed_reads_of_orbax_are_dropped_and_other_task_errors_kept)."""
    faults.DAMAGES[damage](base_copy / "checkpoints" / "4")
    with caplog.at_level(logging.DEBUG), faults.stop_before_the_first_step() as run:
        loop.train(tiny_config(6, **BASE), base_copy)
        gc.collect()
    assert run["start"] == 2
    noisy = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not noisy, [f"{r.name}: {r.getMessage()[:200]}" for r in noisy]
    assert len(re.findall(r"checkpoints/4 cannot be restored", caplog.text)) == 1, caplog.text


async def async_deserialize():  # named as Orbax's tensor read
    raise ValueError("DATA_LOSS: a read of a damaged step")


async def _read_array_index_and_device_put():  # named as Orbax's read of one shard
    raise ValueError("FAILED_PRECONDITION: a read of a damaged step")


async def other_work():
    raise ValueError("an error someone must see")


def test_unretrieved_failed_reads_of_orbax_are_dropped_and_other_task_errors_kept(tmp_path,
                                                                                 caplog):
    """What the fault benchmark saw at exit after a zeroed tensor file: asyncio logging "Task
    exception was never retrieved" for each of Orbax's failed `async_deserialize` reads, and (in
    CI, after a deleted tensor file) for asyncio's task around a failed TensorStore future, and
    (after a deleted tensor file of a 40-step run) for Orbax's shard reads and bare futures
    holding TensorStore's read error, and (a zeroed tensor file, 2 of 25 runs) for the
    asyncio.gather of a tensor's shard reads holding Orbax's read error. Those are dropped once
    a manager exists; the same report about any other coroutine or future is kept."""
    import asyncio

    def collect_unretrieved(awaitable):
        event_loop = asyncio.new_event_loop()
        task = asyncio.ensure_future(awaitable(), loop=event_loop)
        event_loop.run_until_complete(asyncio.sleep(0.01))
        event_loop.close()
        del task
        gc.collect()

    def failed_tensorstore_read():
        return ts.open({"driver": "zarr", "kvstore": f"file://{tmp_path}/missing/"}, open=True)

    def failed_future(error):
        async def make():
            asyncio.get_running_loop().create_future().set_exception(ValueError(error))
        return make

    def gathered(awaitable):  # asyncio.gather of one read, its result never retrieved
        async def make():
            asyncio.gather(awaitable())
        return make

    async def orbax_shard_read_error():  # what Orbax raises from a failed shard read
        raise Exception("Encountered error while reading array index: (slice(0, 16, 1), "
                        "slice(32, 64, 1)). See full TensorStore details: ...")

    ckpt.make_manager(tmp_path, keep=1, async_save=False)
    with caplog.at_level(logging.ERROR, "asyncio"):
        collect_unretrieved(gathered(orbax_shard_read_error))
        collect_unretrieved(async_deserialize)
        collect_unretrieved(failed_tensorstore_read)
        collect_unretrieved(_read_array_index_and_device_put)
        collect_unretrieved(failed_future('FAILED_PRECONDITION: Error reading "mu/3.0" in OCDBT '
                                          'database at local file "/tmp/x/40/state/"'))
        assert not caplog.records, caplog.text
        collect_unretrieved(other_work)
        collect_unretrieved(failed_future("an error someone must see"))
        collect_unretrieved(gathered(other_work))
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 3 and reports[0].startswith("Task exception was never retrieved")
    assert reports[1].startswith("Future exception was never retrieved")
    assert reports[2].startswith("_GatheringFuture exception was never retrieved")
