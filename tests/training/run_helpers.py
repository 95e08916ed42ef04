"""The tiny run config shrunk for tests (in-process and as command-line flags), and metrics.jsonl
reading."""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402

# What the tests change in configs/tiny.py (also passed as --config.<key>=<value> flags).
TINY_OVERRIDES = {
    "train.batch_size": 4,
    "data.max_length": 64,
    "data.helpful_count": 32,
    "data.rto_count": 16,
    "data.prefix_count": 16,
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
    "checkpoint.async_save": False,
    "loss.rto_keep": 0.5,  # the step rng matters, so resume must restore it
}


def tiny_config(steps: int, **overrides):
    """configs/tiny.py with TINY_OVERRIDES, `steps` steps and `overrides` ({"train__seed": 1})."""
    config = tiny.get_config()
    config.train.steps = steps
    for key, value in {**TINY_OVERRIDES, **{k.replace("__", "."): v
                                            for k, v in overrides.items()}}.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


def tiny_flags(steps: int, **overrides) -> list[str]:
    """The same config as `tiny_config` as command-line flags of `python -m derta_jax.train`."""
    values = {**TINY_OVERRIDES, "train.steps": steps,
              **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["--config=configs/tiny.py", *(f"--config.{k}={v}" for k, v in values.items())]


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
