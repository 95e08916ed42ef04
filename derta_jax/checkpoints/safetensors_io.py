"""Safetensors files, one tensor at a time: folder discovery, headers, streamed reads and writes.

Reading checks the headers with `safe_open(framework="numpy")` and maps one tensor at a time
from its file. Writing plans the shards from the shapes, writes each header first and then
appends the tensors a block of rows at a time, so a shard is never held in memory either. Pickle
weights (`*.bin`, `*.pt`, ...) are refused. Nothing here knows the model: names and shapes come
from the caller (`names.py`). Folders and output files may be bucket URLs (gs://...): the file
list and index are read there (the caller downloads the files it maps, `hf.py`), and
`write_safetensors` streams into the object directly.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from collections.abc import Iterable, Sequence
from typing import BinaryIO, Protocol, TypeVar

import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import safe_open

from derta_jax import storage

INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's tensor name -> shard file
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": "F32", "bfloat16": "BF16"}  # what we write: numpy name -> safetensors name
# Tensor name -> (file name it is in, shape): what the headers say, before any data is read.
Found = dict[str, tuple[str, tuple[int, ...]]]


class Planned(Protocol):
    """A tensor to write: its name and shape are known before its data."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


T = TypeVar("T", bound=Planned)


# ---- reading ---------------------------------------------------------------------------------
def safetensors_files(folder: str | os.PathLike) -> list[epath.Path]:
    """The safetensors files of a checkpoint folder (sharded via the index, or all of them); a
    bucket URL's are URLs.

    Raises ValueError for pickle-only folders and for index entries whose file is missing.
    """
    folder = storage.path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index} lists shard files that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); they are refused because "
            "loading pickle can run arbitrary code. Use safetensors or GGUF only (for example "
            "re-save the model with save_pretrained(..., safe_serialization=True)).")
    raise ValueError(f"no *.safetensors files in {folder}")


def read_shapes(files: Sequence[pathlib.Path]) -> Found:
    """Tensor name -> (file name, shape), from the headers only."""
    found: Found = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if name in found:
                    raise ValueError(f"tensor {name!r} appears in both {found[name][0]} and {path.name}")
                found[name] = (path.name, tuple(f.get_slice(name).get_shape()))
    return found


# The safetensors dtypes a checkpoint may store (names.lazy_tree casts them to the output dtype).
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}


def read_tensor(folder: pathlib.Path, found: Found, name: str) -> np.ndarray:
    """One tensor, mapped read-only from its file (`np.memmap`): nothing is read until touched,
    and what is touched can be dropped again (`names.release_pages`)."""
    path = folder / found[name][0]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[name]
    dtype = _NUMPY_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} in {path} has dtype {entry['dtype']}; weights must be "
                         f"one of {', '.join(_NUMPY_DTYPES)}")
    shape, (start, end) = tuple(entry["shape"]), entry["data_offsets"]
    fits = math.prod(shape) * np.dtype(dtype).itemsize == end - start
    if not fits or 8 + n + end > path.stat().st_size:
        raise ValueError(f"tensor {name!r} in {path}: its byte range {start}-{end} does not fit "
                         f"its shape {list(shape)} or the file (truncated?)")
    if not shape or math.prod(shape) == 0:  # np.memmap cannot map nothing
        return np.fromfile(path, dtype, math.prod(shape), offset=8 + n + start).reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)


# ---- writing ---------------------------------------------------------------------------------
def plan_shards(tensors: Sequence[T], itemsize: int, max_bytes: int) -> list[list[T]]:
    """Greedy, in order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[T]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def header(tensors: Sequence[Planned], dtype: str) -> bytes:
    """The safetensors header: JSON with each tensor's dtype, shape and byte range, 8-aligned."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset, itemsize = 0, jnp.dtype(dtype).itemsize
    for t in tensors:
        end = offset + math.prod(t.shape) * itemsize
        meta[t.name] = {"dtype": DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | os.PathLike, tensors: Sequence[Planned],
                      arrays: Iterable[np.ndarray], dtype: str) -> None:
    """Streams `arrays` (one per tensor, in order) into one safetensors file, a local path or a
    bucket URL.

    A bucket object is written straight through epath's `open("wb")` rather than staged: gcsfs
    uploads it in parts (its block size, a few MB) as the rows are written, so host memory stays
    one tensor plus one part, as for a local file, and no local disk the size of the export is
    needed (a 70B model's would not fit a TPU VM's boot disk). As locally, an interrupted write
    leaves a partial file (the index, written last, is then missing).
    """
    with storage.path(path).open("wb") as f:
        f.write(header(tensors, dtype))
        for t, array in zip(tensors, arrays, strict=True):
            if array.shape != t.shape:
                raise ValueError(f"tensor {t.name} came out with shape {list(array.shape)}, "
                                 f"expected {list(t.shape)}")
            _write_rows(f, array, jnp.dtype(dtype))
            del array


def _write_rows(f: BinaryIO, array: np.ndarray, dtype: np.dtype,
                block_bytes: int = 16 * 2**20) -> None:
    """Writes `array` in C order as `dtype`, a block of rows at a time: a transposed view is
    made contiguous (and cast) block by block, never as a second whole copy."""
    rows = array.reshape(1, -1) if array.ndim < 2 else array
    step = max(1, block_bytes // max(1, rows[0].size * dtype.itemsize))
    for start in range(0, rows.shape[0], step):
        block = np.ascontiguousarray(rows[start:start + step], dtype=dtype)
        f.write(block.reshape(-1).view(np.uint8).data)
