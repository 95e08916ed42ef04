"""The one way eval, generate and the classifier judge load a model for inference.

    ckpt = resolve_checkpoint(<model dir | training workdir | workdir/checkpoints/<step>>, step)
    model = load_eval_model(ckpt, dtype=None, mesh=None)   # -> EvalModel, params on the mesh

Tensors are read one at a time (`checkpoints/resolve.py`), LoRA adapters are merged into their
kernels on the way, and each process reads only the slices of each tensor that its own devices
hold on the mesh (`Checkpoint.on_devices`, logical-axis rules): a host reads its share of the
model, never the whole of it (its peak memory: benchmarks/README.md, "Host memory per process").
A checkpoint in a bucket (gs://...) is read from it directly; its tokenizer through a local copy
of the tokenizer files only (`model_dir.load_tokenizer`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh

from derta_jax import storage
from derta_jax.checkpoints.model_dir import load_tokenizer
from derta_jax.checkpoints.resolve import Checkpoint, resolve_checkpoint
from derta_jax.evaluation.generation import param_shardings
from derta_jax.models.config import ModelConfig
from derta_jax.training import sharding as shd


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """What answering (and the classifier judge) needs: the model (LoRA already merged), its
    tokenizer and a name for the report."""

    name: str
    cfg: Any
    params: Any
    tokenizer: Any


def parse_mesh(text: str | None) -> Mesh:
    """`--mesh DATA,FSDP,TENSOR` (one may be -1); None = every device on the data axis."""
    if text is None:
        return shd.make_mesh(shd.MeshConfig())
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise ValueError(f"--mesh {text!r}: expected three integers DATA,FSDP,TENSOR (e.g. -1,1,8)")
    return shd.make_mesh(shd.MeshConfig(*sizes))


def inference_config(cfg: ModelConfig, dtype: str | None = None) -> ModelConfig:
    """The config to generate with: canonical layer layout, no remat, adapters merged away;
    `dtype` (float32 | bfloat16) sets both the compute and the parameter dtype."""
    cfg = cfg.replace(scan_layers=False, remat="none", lora_rank=0, lora_dropout=0.0)
    return cfg if dtype is None else cfg.replace(dtype=dtype, param_dtype=dtype)


def model_name(ckpt: Checkpoint) -> str:
    """The report's name: the model dir's name, or `<workdir name>@<step>`."""
    folder = ckpt.tokenizer_dir if ckpt.kind == "model_dir" else ckpt.tokenizer_dir.parent
    return folder.name if ckpt.step is None else f"{folder.name}@{ckpt.step}"


def load_eval_model(ckpt: Checkpoint | str | os.PathLike, dtype: str | None = None,
                    mesh: Mesh | None = None) -> EvalModel:
    """The params of a resolved checkpoint on `mesh` (default: every device on the data axis),
    LoRA merged, cast to `dtype` when given, with the tokenizer saved beside them."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = resolve_checkpoint(ckpt)
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: expected float32 or bfloat16")
    cfg = inference_config(ckpt.cfg, dtype)
    mesh = parse_mesh(None) if mesh is None else mesh
    shardings = traverse_util.flatten_dict(param_shardings(cfg, mesh)["params"])
    flat: dict[tuple[str, ...], Any] = {}
    for path in ckpt.params:  # each process reads only its devices' slices
        flat[path] = ckpt.on_devices(path, shardings[path], dtype and jnp.dtype(dtype))
    params = traverse_util.unflatten_dict(flat)
    return EvalModel(model_name(ckpt), cfg, params, load_tokenizer(ckpt.tokenizer_dir))


def tokenizer_dir(path: str | os.PathLike) -> epath.Path:
    """The tokenizer folder of a model dir, a training workdir (its model/), one of its steps, or
    a plain folder of tokenizer files; each a local folder or a bucket URL."""
    path = storage.path(path)
    for folder in (path, path / "model", path.parent.parent / "model"):
        if (folder / "tokenizer_config.json").exists():
            return folder
    raise ValueError(f"{path}: no tokenizer_config.json (expected a model dir, a training workdir "
                     "or a tokenizer folder)")
