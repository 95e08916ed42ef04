"""The convert step in front of export, on the tiny reference models of tests/conftest.py."""
import pathlib

import pytest

from derta_jax import convert


@pytest.fixture(scope="session")
def model_dir(hf_checkpoint, llama3_tokenizer_dir, tmp_path_factory):
    """kind -> a model dir converted from hf_checkpoint(kind) by `python -m derta_jax.convert`."""
    cache: dict[str, pathlib.Path] = {}

    def get(kind: str) -> pathlib.Path:
        if kind not in cache:
            folder, _ = hf_checkpoint(kind)
            out = tmp_path_factory.mktemp(f"md_{kind}") / "model"
            cache[kind] = convert.main(["--hf", str(folder), "--out", str(out),
                                        "--tokenizer", str(llama3_tokenizer_dir)])
        return cache[kind]

    return get
