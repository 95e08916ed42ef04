"""The model dir: what `python -m derta_jax.convert` writes and every entry point reads.

    <model dir>/model_config.json   ModelConfig.to_json()
    <model dir>/params/             Orbax checkpoint of the canonical tree (chunks of CHUNK_BYTES),
                                    read by checkpoints/resolve.py
    <model dir>/tokenizer.json, ... the tokenizer (transformers `save_pretrained` files)

A model dir without `params/` (config and tokenizer only) is what a training workdir keeps.
It may be a local folder or a bucket URL (gs://...): Orbax writes and reads `params/` in the
bucket directly; the tokenizer files go through a local folder (`storage.staged` on the way up,
`local_tokenizer_dir` on the way down, which copies the small files only, never the weights).
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import weakref
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from derta_jax import storage
from derta_jax.checkpoints.names import LazyTensor
from derta_jax.models.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
# Tensors are stored in chunks of at most this many bytes: reading a slice (a process's shards)
# decodes only the chunks it touches, not the whole tensor (benchmarks/README.md, "Host memory
# per process").
CHUNK_BYTES = 16 << 20
# Files of a folder that are weights, never tokenizer files: not copied down for a tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack",
                   ".h5", ".npz", ".onnx")


def save_model_dir(out: str | os.PathLike, cfg: ModelConfig, params: Any | None,
                   tokenizer: PreTrainedTokenizerBase | None) -> epath.Path:
    """Writes `out/model_config.json`, `out/params/` (unless params is None) and the tokenizer.

    `params` is the canonical tree: numpy arrays, jax arrays, or `LazyTensor`s, which are read
    and written one at a time (`convert` holds one tensor at a time), each in chunks of at most
    CHUNK_BYTES. Saving adds almost no host memory to the tree itself (see
    `_params_checkpointer`). Refuses to overwrite existing params.
    """
    out = storage.path(out)
    if (out / PARAMS_DIR).exists():
        raise ValueError(f"{out / PARAMS_DIR} already exists; remove it or choose another output")
    if not storage.is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(cfg.to_json())
    if tokenizer is not None:
        with storage.staged(out) as local:  # save_pretrained writes local files only
            tokenizer.save_pretrained(str(local))
    if params is not None:
        chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params,
                               is_leaf=lambda x: isinstance(x, LazyTensor))
        _params_checkpointer().save(out / PARAMS_DIR,
                                    args=ocp.args.PyTreeSave(params, save_args=chunked))
    return out


class _OneAtATimeHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler, writing its leaves one after another, in place (no deep copy): a
    `LazyTensor` is read just before it is written and dropped once it is."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
        for value, info, arg in zip(values, infos, args):
            if not isinstance(value, LazyTensor):
                await super()._background_serialize([value], [info], [arg])
                continue
            array = value.read()
            await super()._background_serialize([array], [info], [arg])
            written = weakref.ref(array)
            del array
            # TensorStore lets go of the source a moment after the write has committed, from its
            # own threads: wait for that (at most a second) so two tensors are never held.
            for _ in range(1000):
                if written() is None:
                    break
                await asyncio.sleep(0.001)


def _params_checkpointer() -> ocp.Checkpointer:
    """A synchronous Orbax checkpointer that writes numpy leaves one at a time without copying.

    Orbax's default numpy handler deep-copies every array before writing, its jax.Array handler
    keeps a host copy of each array alive until the save ends, and zstd compression buffers the
    compressed chunks: each of these costs about one extra copy of the tree. Numpy leaves and
    `LazyTensor`s are written in place, one at a time, uncompressed and without OCDBT (measured:
    benchmarks/README.md, "Conversion and export memory"); they are stored as Orbax's numpy
    arrays. Leaves that are already jax arrays use Orbax's array handler. `resolve.py` reads
    either kind.
    """
    numpy_handler = _OneAtATimeHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler), (LazyTensor, numpy_handler),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        use_ocdbt=False, use_compression=False, type_handler_registry=registry))


def _require(path: epath.Path, name: str, what: str) -> epath.Path:
    if not (path / name).exists():
        raise ValueError(f"{path} is not a model dir: {name} is missing ({what}); "
                         "create one with `python -m derta_jax.convert`")
    return path / name


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model dir (a folder or a bucket URL)."""
    path = storage.path(path)
    return ModelConfig.from_json(_require(path, CONFIG_FILE, "the model config").read_text())


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer files of a folder (a model dir, a Hugging Face checkpoint), or the tokenizer
    in the GGUF file `path/gguf_file`; a folder in a bucket is read through a local copy of its
    tokenizer files (`local_tokenizer_dir`). Every tokenizer load goes through here: it never
    runs code from the folder (a tokenizer_config.json `auto_map` is refused) and never asks on
    stdin. Errors name `path` as given."""
    path = storage.path(path)
    if gguf_file is None and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})")
    local = (local_tokenizer_dir(path) if gguf_file is None
             else storage.local_copy(path / gguf_file).parent)  # the GGUF file only
    try:
        return AutoTokenizer.from_pretrained(str(local), gguf_file=gguf_file,
                                             trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ValueError(f"{path}: tokenizer_config.json maps the tokenizer to code in the folder "
                         "(auto_map), which derta_jax never runs; use standard tokenizer files "
                         "(tokenizer.json)") from None


def local_tokenizer_dir(folder: str | os.PathLike) -> pathlib.Path:
    """A local folder with the tokenizer files of `folder`: the folder itself when it is local;
    for a bucket URL, a temporary copy (removed when the process exits) of its top-level files
    except weights (`WEIGHT_SUFFIXES`), so a model dir's or HF folder's weights are not
    downloaded. It is kept until exit: a slow tokenizer's `save_pretrained` copies its vocab file
    from there."""
    folder = storage.path(folder)
    if not storage.is_url(folder):
        return pathlib.Path(folder)
    local = storage.temp_dir()
    for f in folder.iterdir():
        if not f.name.endswith(WEIGHT_SUFFIXES) and f.is_file():
            (local / f.name).write_bytes(f.read_bytes())
    return local
