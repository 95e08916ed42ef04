"""Fixtures of the training-run tests: one uninterrupted tiny run shared by the tests that resume,
damage or kill copies of it (the compilation cache they share is tests/conftest.py's)."""
import pathlib
import shutil

import pytest

from tests.training.run_helpers import tiny_config

# The base run: 4 steps, checkpoints at 2 and 4 written in the background.
BASE = dict(checkpoint__every_steps=2, checkpoint__async_save=True)
BASE_STEPS = 4


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
