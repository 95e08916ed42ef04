"""A Hugging Face checkpoint folder (config.json + safetensors) -> ModelConfig and canonical tree.

The names, shapes and layout changes come from the one name map (`names.py`); the files are read
one tensor at a time (`safetensors_io.py`), so peak host memory is the converted tree plus one
tensor. Every name and shape is checked from the headers before any tensor data is read.
Pickle weights are refused; remote code is never run.
"""
from __future__ import annotations

import os
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from derta_jax.checkpoints import safetensors_io
from derta_jax.checkpoints.names import (ParamPath, Params, TensorSpec, canonical_shapes,
                                         hf_tensor_specs, set_leaf)
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


class TreeBuilder:
    """Assembles the canonical tree from Hugging Face arrays, one tensor at a time.

    Stacked expert tensors are allocated once at their full shape and filled per expert.
    """

    def __init__(self, cfg: ModelConfig, dtype: str):
        self.params: Params = {}
        self._dtype = jnp.dtype(dtype)
        self._shapes = canonical_shapes(cfg)
        self._stacked: dict[ParamPath, np.ndarray] = {}

    def add(self, spec: TensorSpec, array: np.ndarray) -> None:
        for path, fn in spec.outputs:
            value = np.ascontiguousarray(fn(array), dtype=self._dtype)
            if spec.expert is None:
                set_leaf(self.params, path, value)
                continue
            if path not in self._stacked:
                self._stacked[path] = np.empty(self._shapes[path], self._dtype)
                set_leaf(self.params, path, self._stacked[path])
            self._stacked[path][spec.expert] = value


def load_hf(folder: str | os.PathLike, dtype: str = "float32",
            progress: bool = True) -> tuple[ModelConfig, Params]:
    """Reads `config.json` and the safetensors of a Hugging Face checkpoint folder.

    Returns the ModelConfig (with `param_dtype=dtype`) and the canonical parameter tree as nested
    dicts of C-contiguous numpy arrays in `dtype` (float32 or bfloat16). Names, shapes and the file
    list are all checked from the headers before any tensor data is read.
    """
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} has no config.json (expected a Hugging Face checkpoint folder)")
    cfg = ModelConfig.from_hf(folder / "config.json", param_dtype=dtype)
    found = safetensors_io.read_shapes(safetensors_io.safetensors_files(folder))
    fused = any(".mlp.experts.gate_up_proj" in n for n in found)
    specs = hf_tensor_specs(cfg, fused_experts=fused)
    ignored = {n for n in found if _IGNORED.match(n)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    check_tensors(specs, found, cfg, str(folder), frozenset(ignored))
    builder = TreeBuilder(cfg, dtype)
    bar = tqdm(total=len(specs), desc=f"loading {folder.name}", unit="tensor", disable=not progress)
    for name, array in safetensors_io.iter_tensors(folder, found, set(specs)):
        builder.add(specs[name], array)
        del array
        bar.update()
    bar.close()
    return cfg, builder.params
