"""A Hugging Face checkpoint folder (config.json + safetensors) -> ModelConfig and canonical tree.

The names, shapes and layout changes come from the one name map (`names.py`); the files are read
one tensor at a time (`safetensors_io.py`) when a leaf of the lazy tree is read, so `convert`
holds one tensor at a time and `load_hf` the converted tree plus one tensor. Every name and shape
is checked from the headers before any tensor data is read.
Pickle weights are refused; remote code is never run. A folder in a bucket (gs://...) is checked
there (config.json, the index, the file list) and then only its safetensors files are downloaded
to a temporary folder, since they are memory-mapped.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from derta_jax import storage
from derta_jax.checkpoints import safetensors_io
from derta_jax.checkpoints.names import (Params, TensorSpec, canonical_shapes, hf_tensor_specs,
                                         lazy_tree, read_tree)
from derta_jax.models.config import ModelConfig

# Derivable buffers some older exports include; never parameters.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def check_tensors(specs: dict[str, TensorSpec], found: safetensors_io.Found, cfg: ModelConfig,
                  where: str, ignored: frozenset[str] = frozenset()) -> None:
    """Raises ValueError naming unexpected, missing or wrongly shaped tensors.

    `found` maps each tensor name in the checkpoint to (file it is in, shape); `ignored` names
    tensors that may be present but are not loaded.
    """
    unexpected = sorted(set(found) - set(specs) - ignored)
    if unexpected:
        raise ValueError(f"unexpected tensors in {where} for model_type={cfg.model_type!r}: "
                         f"{_short(unexpected)}")
    missing = sorted(set(specs) - set(found))
    if missing:
        raise ValueError(f"missing tensors in {where}: {_short(missing)}")
    for name, spec in specs.items():
        source, got = found[name]
        if got != spec.shape:
            raise ValueError(f"tensor {name!r} in {source} has shape {list(got)}, expected "
                             f"{list(spec.shape)} from the model config")


def _short(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def counting(read: Callable[[str], np.ndarray], specs: dict[str, TensorSpec], desc: str,
             progress: bool) -> Callable[[str], np.ndarray]:
    """`read`, with a progress bar over the source reads of a whole lazy tree of `specs` (a fused
    tensor is read once per output), closed after the last."""
    total = sum(len(spec.outputs) for spec in specs.values())
    bar = tqdm(total=total, desc=desc, unit="tensor", disable=not progress)

    def counted(name: str) -> np.ndarray:
        array = read(name)
        bar.update()
        if bar.n >= total:
            bar.close()
        return array
    return counted


def lazy_hf(folder: str | os.PathLike, dtype: str = "float32", progress: bool = True
            ) -> tuple[ModelConfig, Params]:
    """Reads `config.json` and the safetensors headers of a Hugging Face checkpoint folder.

    Returns the ModelConfig (with `param_dtype=dtype`) and the canonical tree of `LazyTensor`s in
    `dtype` (float32 or bfloat16): no tensor data is read until a leaf is. Names, shapes and the
    file list are all checked from the headers first. A bucket URL's safetensors files are
    downloaded first (`storage.local_copy`); messages name the folder as given.
    """
    folder = storage.path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} has no config.json (expected a Hugging Face checkpoint folder)")
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()), param_dtype=dtype)
    # File name -> a local path of it (the file itself, or its download).
    local = {f.name: storage.local_copy(f) for f in safetensors_io.safetensors_files(folder)}
    found = safetensors_io.read_shapes(list(local.values()))
    fused = any(".mlp.experts.gate_up_proj" in n for n in found)
    specs = hf_tensor_specs(cfg, fused_experts=fused)
    ignored = {n for n in found if _IGNORED.match(n)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    check_tensors(specs, found, cfg, str(folder), frozenset(ignored))

    def read_file(name: str) -> np.ndarray:
        return safetensors_io.read_tensor(local[found[name][0]].parent, found, name)

    read = counting(read_file, specs, f"converting {folder.name}", progress)
    return cfg, lazy_tree(specs, canonical_shapes(cfg), dtype, read)


def load_hf(folder: str | os.PathLike, dtype: str = "float32",
            progress: bool = True) -> tuple[ModelConfig, Params]:
    """`lazy_hf`, read: the canonical tree as nested dicts of C-contiguous numpy arrays."""
    cfg, tree = lazy_hf(folder, dtype, progress)
    return cfg, read_tree(tree)
