"""data/prepared.py: examples tokenised once into array_record, keyed by what they depend on,
read back equal to a fresh build, by random access, with the build's log replayed."""
import dataclasses
import json
import logging
import re
import shutil

import numpy as np
import pytest

from derta_jax.data import loader, pipeline, prepared
from derta_jax.data.tokenize import BuildStats, TokenizedExample
from derta_jax.training import config as config_lib


def data_config(tmp_path, **changes):
    return config_lib.DataConfig(**{"data_dir": str(tmp_path / "data"), "max_length": 64,
                                    "helpful_count": 24, "rto_count": 8, "prefix_count": 8,
                                    **changes})


def fresh(d, tokenizer):
    return pipeline.training_examples(tokenizer, **prepared.options(d))[0]


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for field in dataclasses.fields(TokenizedExample):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(y, np.ndarray):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y, field.name


@pytest.mark.parametrize("changes", [{}, {"cut": "token"}, {"recipe": "preference", "rto_count": -1, "helpful_count": -1,
                                                             "prefix_count": -1, "pairs_count": 8}],
                         ids=["word cut", "token cut", "preference pairs"])
def test_prepared_examples_equal_a_fresh_build_and_plan_alike(tmp_path, llama3, changes):
    d = data_config(tmp_path, **changes)
    got, want = prepared.examples(d, llama3), fresh(d, llama3)
    assert isinstance(got, prepared.PreparedExamples)
    assert_same(got, want)
    assert_same(got[2:5], want[2:5])
    table = got.table  # the index holds what the planner reads, as a scan of the examples
    for name, column in loader.table_of(want).items():
        np.testing.assert_array_equal(table[name], column, err_msg=name)
    plan = loader.make_plan(got, 8, 64, seed=1, epochs=2)
    assert plan == loader.make_plan(want, 8, 64, seed=1, epochs=2)
    for step in (0, plan.total_steps - 1):
        a, b = loader.step_batch(got, plan, 1, step), loader.step_batch(want, plan, 1, step)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_a_second_use_reads_the_folder_and_replays_the_build_log(tmp_path, llama3, caplog,
                                                                 monkeypatch):
    d = data_config(tmp_path, rto_count=-1)  # the official count: more than the demo has
    with caplog.at_level(logging.INFO):
        first = prepared.examples(d, llama3)
    built = [r.getMessage() for r in caplog.records if r.name.startswith("derta_jax.data.")
             and r.name != prepared.__name__]
    assert any("of the official" in m for m in built)
    caplog.clear()
    monkeypatch.setattr(pipeline, "training_examples", lambda *a, **k: pytest.fail("rebuilt"))
    with caplog.at_level(logging.INFO):
        second = prepared.examples(d, llama3)
    assert second.folder == first.folder
    assert [r.getMessage() for r in caplog.records if r.name != prepared.__name__] == built
    assert any("examples read from" in r.getMessage() for r in caplog.records)


def test_the_key_follows_the_inputs_and_the_tokenizer(tmp_path, llama3, smollm2):
    safety = tmp_path / "safety.jsonl"
    shutil.copy(pipeline.DEMO_SAFETY, safety)
    d = data_config(tmp_path, safety=str(safety))
    base = prepared.key(d, llama3)
    assert prepared.key(data_config(tmp_path, safety=str(safety)), llama3) == base
    assert prepared.key(dataclasses.replace(d, data_dir="elsewhere", packing=False), llama3) == base
    assert prepared.key(dataclasses.replace(d, max_length=128), llama3) != base
    assert prepared.key(dataclasses.replace(d, seed=1), llama3) != base
    assert prepared.key(d, smollm2) != base
    lines = safety.read_text().splitlines()
    safety.write_text("\n".join(lines[:-1]) + "\n")  # one row less: other content, other key
    assert prepared.key(d, llama3) != base


def test_a_damaged_folder_is_one_error_naming_it(tmp_path, llama3):
    d = data_config(tmp_path)
    folder = prepared.examples(d, llama3).folder
    records = folder / prepared.RECORDS
    records.write_bytes(records.read_bytes()[:len(records.read_bytes()) // 2])
    with pytest.raises(ValueError, match=f"prepared examples in {folder} are damaged.*remove"):
        ex = prepared.examples(d, llama3)
        ex[len(ex) - 1]


def test_records_round_trip_every_kind_of_example():
    kinds = [
        TokenizedExample(np.arange(1, 9, dtype=np.int32), prompt_len=3),
        TokenizedExample(np.arange(1, 12, dtype=np.int32), prompt_len=2, refusal_id=7,
                         cut_len=4, max_cut=3, uncut=np.arange(5, 11, dtype=np.int32),
                         turns=((1, 2),)),
        TokenizedExample(np.arange(1, 6, dtype=np.int32), prompt_len=2,
                         rejected=np.arange(20, 27, dtype=np.int32)),
    ]
    for ex in kinds:
        back = prepared.decode(prepared.encode(ex))
        assert_same([back], [ex])
        t = loader.table_of([ex])  # the planner's lengths: length0 for k = 0, else full + k
        assert [int(t["length0"][0]) if k == 0 else int(t["full"][0]) + k
                for k in range(ex.max_cut + 1)] == [ex.length(k) for k in range(ex.max_cut + 1)]
    with pytest.raises(ValueError, match="attached after preparation"):
        prepared.encode(dataclasses.replace(kinds[0], ref_logps=np.zeros(8, np.float32)))
    record = prepared.encode(kinds[1])
    with pytest.raises(ValueError, match="holds"):
        prepared.decode(record + b"\0\0\0\0")
    assert json.loads(record[4:4 + int.from_bytes(record[:4], "little")])["ids"] == \
        {"tokens": 11, "uncut": 6}


def test_a_host_that_does_not_see_process_0s_folder_prepares_its_own(tmp_path, llama3, caplog,
                                                                     monkeypatch):
    """Process 1 of 2 with a data_dir that is not shared: after the barrier it finds nothing,
    says so, and prepares the same examples itself."""
    synced = []

    def allgather(ok):  # process 0 said it prepared them (somewhere this host cannot see)
        synced.append(ok)
        return np.array([True, ok])

    monkeypatch.setattr(prepared.jax, "process_index", lambda: 1)
    monkeypatch.setattr(prepared.jax, "process_count", lambda: 2)
    monkeypatch.setattr(prepared.multihost_utils, "process_allgather", allgather)
    d = data_config(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = prepared.examples(d, llama3)
    assert len(synced) == 1
    assert any("not visible from process 1" in r.getMessage() for r in caplog.records)
    assert_same(got, fresh(d, llama3))


def test_a_bad_source_stops_every_process_and_leaves_nothing_behind(tmp_path, llama3,
                                                                    monkeypatch):
    """Process 0 of 2 fails on a bad row: it still joins the other processes (which then stop
    too, none waiting for it), raises the row's error and leaves no half-written folder."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "What is 2 plus 2?"}\n')  # no output
    gathered = []

    def allgather(ok):
        gathered.append(bool(ok))
        return np.array([ok, True])

    monkeypatch.setattr(prepared.jax, "process_count", lambda: 2)
    monkeypatch.setattr(prepared.multihost_utils, "process_allgather", allgather)
    with pytest.raises(ValueError, match="bad.jsonl"):
        prepared.examples(data_config(tmp_path, helpful=str(bad)), llama3)
    assert gathered == [False]
    assert not list((tmp_path / "data" / prepared.SUBDIR).iterdir())
    monkeypatch.setattr(prepared.jax, "process_index", lambda: 1)
    monkeypatch.setattr(prepared.multihost_utils, "process_allgather",
                        lambda ok: np.array([False, ok]))
    with pytest.raises(ValueError, match="process 0 could not prepare"):
        prepared.examples(data_config(tmp_path, helpful=str(bad)), llama3)


def test_tokenising_in_chunks_gives_the_same_examples_and_counts(tmp_path, llama3):
    """Preparation tokenises CHUNK records at a time: any chunk size gives what one chunk does."""
    d = data_config(tmp_path, cut="token")
    whole, stats = pipeline.training_examples(llama3, **prepared.options(d))
    parts, chunked = [], BuildStats()
    for chunk in pipeline.tokenised_chunks(chunked, llama3, chunk_size=7, **prepared.options(d)):
        assert len(chunk) <= 7
        parts.extend(chunk)
    assert_same(parts, whole)
    assert chunked == stats and stats.examples == len(whole) > 7


def test_a_data_dir_that_cannot_hold_folders_is_one_error_naming_it(tmp_path, llama3):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(ValueError, match=f"cannot prepare examples in data.data_dir "
                                         f"{re.escape(str(not_a_folder))}: "):
        prepared.examples(data_config(tmp_path, data_dir=str(not_a_folder)), llama3)
