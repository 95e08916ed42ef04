"""storage.py against a fake gs:// bucket: paths stay URLs, copies down and up round-trip, appends
keep what was there."""
import os
import pathlib

import pytest

from derta_jax import storage


def test_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("gs://b/x/y") / "z") == "gs://b/x/y/z"
    assert storage.path("rel/dir") == tmp_path / "rel" / "dir"
    assert storage.path("~/a") == pathlib.Path(os.path.expanduser("~/a"))
    assert storage.is_url("gs://b") and not storage.is_url("/gs/b") and not storage.is_url("a:b")


def test_folder_round_trip_through_the_bucket(tmp_path, bucket):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text('{"a": 1}')
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    storage.upload(src, f"{bucket}/round_trip/dir")
    remote = storage.path(f"{bucket}/round_trip/dir")
    assert (remote / "sub" / "b.bin").exists() and (remote / "a.json").read_text() == '{"a": 1}'
    back = storage.local_copy(remote)
    assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == \
        ["a.json", "sub/b.bin"]
    assert (back / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    one = storage.local_copy(f"{bucket}/round_trip/dir/a.json")
    assert one.read_text() == '{"a": 1}'
    with pytest.raises(FileNotFoundError, match="round_trip/missing"):
        storage.local_copy(f"{bucket}/round_trip/missing")


def test_staged_writes_reach_the_bucket_only_on_success(bucket):
    with storage.staged(f"{bucket}/staged/ok") as local:
        (local / "f.txt").write_text("done")
    assert storage.path(f"{bucket}/staged/ok/f.txt").read_text() == "done"
    with pytest.raises(RuntimeError):
        with storage.staged(f"{bucket}/staged/failed") as local:
            (local / "f.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert not storage.path(f"{bucket}/staged/failed/f.txt").exists()


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_append_text_keeps_the_earlier_lines(where, tmp_path, bucket):
    p = storage.path(f"{bucket}/append/log.jsonl" if where == "bucket" else tmp_path / "log.jsonl")
    storage.append_text(p, "one\n")
    storage.append_text(p, "two\n")
    assert p.read_text() == "one\ntwo\n"


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_write_whole_replaces_the_contents(where, tmp_path, bucket):
    p = storage.path(f"{bucket}/whole/f.json" if where == "bucket" else tmp_path / "f.json")
    storage.write_whole(p, "old")
    storage.write_whole(p, b"new")
    assert p.read_text() == "new" and not p.with_name("f.json.tmp").exists()
