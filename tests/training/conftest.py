"""Fixtures of the training-run tests: one uninterrupted tiny run shared by the tests that resume,
damage or kill copies of it, and a persistent compilation cache so that the same step compiles
once per session (in-process and in the fault test's subprocesses)."""
import pathlib
import shutil

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from tests.training.run_helpers import tiny_config

# The base run: 4 steps, checkpoints at 2 and 4 written in the background.
BASE = dict(checkpoint__every_steps=2, checkpoint__async_save=True)
BASE_STEPS = 4


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> pathlib.Path:
    """JAX's persistent compilation cache in a session folder: every `loop.train` jits its step
    anew, and the tests' runs share a few shapes (the pattern of experiments/ablation.py)."""
    key = "jax_compilation_cache_dir"
    path = tmp_path_factory.mktemp("jax_cache")
    before = getattr(jax.config, key)
    jax.config.update(key, str(path))
    compilation_cache.reset_cache()
    yield path
    jax.config.update(key, before)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, compile_cache, llama3_tokenizer_dir) -> pathlib.Path:
    """The workdir of an uninterrupted tiny_config(4, **BASE) run (copy it before changing it)."""
    from derta_jax.training import loop
    workdir = tmp_path_factory.mktemp("base") / "run"
    loop.train(tiny_config(BASE_STEPS, **BASE), workdir)
    return workdir


@pytest.fixture
def base_copy(base_run, tmp_path) -> pathlib.Path:
    work = tmp_path / "run"
    shutil.copytree(base_run, work)
    return work
