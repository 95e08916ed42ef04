"""W&B (train.wandb_project): the rows of metrics.jsonl also go to an offline W&B run; a configured
but missing wandb is a config error naming the key, before anything is built."""
import json
import pathlib
import struct
import sys

import pytest

from derta_jax.training import loop, workdir as workdir_lib
from tests.training.run_helpers import read_metrics, tiny_config


def wandb_history(path: pathlib.Path) -> list[dict]:
    """The history rows of a .wandb file (W&B's LevelDB-style log of protobuf Records: a 7-byte
    header, then 32 KiB blocks of chunks with a crc32/length/type header; type 1 full, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


@pytest.fixture
def no_wandb_env(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_mode_follows_wandb_mode_else_the_api_key(no_wandb_env, monkeypatch):
    assert workdir_lib.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert workdir_lib.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert workdir_lib.wandb_mode() == "disabled"


def test_offline_run_holds_the_metrics_rows(tmp_path, llama3_tokenizer_dir, no_wandb_env,
                                             monkeypatch):
    pytest.importorskip("wandb")
    files = tmp_path / "wandb_files"
    files.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(files))
    config = tiny_config(steps=2, train__wandb_project="derta-test", train__wandb_run="tiny")
    loop.train(config, tmp_path / "run")  # neither WANDB_MODE nor WANDB_API_KEY: offline

    runs = sorted((files / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((files / "wandb").iterdir())
    run_id = (tmp_path / "run" / workdir_lib.WANDB_ID_FILE).read_text()
    assert runs[0].name.endswith(run_id)
    history = wandb_history(runs[0] / f"run-{run_id}.wandb")
    rows = read_metrics(tmp_path / "run")
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == [1, 2]
    for h, row in zip(history, rows):
        assert {k: v for k, v in h.items() if not k.startswith("_")} == {
            k: pytest.approx(v) for k, v in row.items() if k != "step"}


def test_configured_but_missing_wandb_is_one_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec gives None
    built = []
    monkeypatch.setattr(loop, "_prepare", lambda *a: built.append(a))
    with pytest.raises(ValueError, match=r"^config train\.wandb_project='p': the wandb package "
                                         r"is not installed") as e:
        loop.train(tiny_config(steps=2, train__wandb_project="p"), tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not built and not (tmp_path / "run").exists()
