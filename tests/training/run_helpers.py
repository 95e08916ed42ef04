"""The tiny run config shrunk for tests, and metrics.jsonl reading."""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402


def tiny_config(steps: int):
    config = tiny.get_config()
    config.train.steps = steps
    config.train.batch_size = 4
    config.data.max_length = 64
    config.data.helpful_count = 32
    config.data.rto_count = 16
    config.data.prefix_count = 16
    config.mesh.data = 2
    config.mesh.fsdp = 2
    config.mesh.tensor = 2
    config.checkpoint.async_save = False
    config.loss.rto_keep = 0.5  # the step rng matters, so resume must restore it
    return config


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
