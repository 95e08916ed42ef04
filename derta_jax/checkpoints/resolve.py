"""Find the weights behind a `--checkpoint` argument and read them one tensor at a time.

    resolve_checkpoint(<model dir>)                       the params of `python -m derta_jax.convert`
    resolve_checkpoint(<training workdir>, step=None)     the latest (or `step`) training checkpoint
    resolve_checkpoint(<workdir>/checkpoints/<step>)      that step

Tensors are read straight from the Orbax checkpoint's per-array TensorStore storage (with Orbax's
own read spec), so a training checkpoint saved sharded over many devices is never gathered whole:
`read_param` returns one canonical tensor (one layer's slice of a `scan_layers` stack).

A training workdir resolves to its newest step that resolves (metadata readable, tensors as the
config says); a step that does not is skipped with a warning naming it and the reason, as the
trainer sets such a step aside (training/checkpointing.py). Eval, generate and export all resolve
through here, and every tensor read is refused when it holds a NaN or an infinity.
Every path may be a bucket URL (gs://...): the metadata and tensors are read from the bucket
directly (epath, Orbax and TensorStore), and messages name the URL.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from derta_jax import storage
from derta_jax.checkpoints.names import ParamPath, canonical_shapes, check_params, set_leaf
from derta_jax.checkpoints.model_dir import CONFIG_FILE, PARAMS_DIR, load_config
from derta_jax.models.config import ModelConfig
from derta_jax.models.lora import scale as lora_scale

WORKDIR_MODEL = "model"
WORKDIR_CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"
_ALIGN = 64  # bytes: what the CPU backend needs to take a host array as a device buffer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where a canonical tensor lives: an Orbax leaf and the index into its leading axes."""

    leaf: ParamPath
    index: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: its config, tokenizer folder and one-tensor-at-a-time readers.

    `kind` is "model_dir" or "workdir"; `step` is the training step (None for a model dir).
    `params` and `lora` map canonical paths (`("layers_0", "attn", "q_proj", "kernel")`,
    `("layers_0", "attn", "q_proj", "lora_a")`) to where they are stored.
    """

    cfg: ModelConfig
    tokenizer_dir: epath.Path
    item_dir: epath.Path
    kind: str
    step: int | None
    params: dict[ParamPath, StoredTensor]
    lora: dict[ParamPath, StoredTensor]
    use_ocdbt: bool
    use_zarr3: bool

    @property
    def has_lora(self) -> bool:
        return bool(self.lora)

    def read_param(self, path: ParamPath, index: tuple[int, ...] = ()) -> np.ndarray:
        """The canonical tensor at `path` (or its slice at `index`, e.g. one expert), as stored."""
        if path not in self.params:
            raise ValueError(f"no parameter {'/'.join(path)} in {self.item_dir}")
        return self._read(self.params[path], index)

    def read_lora(self, kernel: ParamPath, index: tuple[int, ...] = ()
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(lora_a, lora_b) of the projection whose kernel is at `kernel` (sliced at `index`)."""
        a, b = kernel[:-1] + ("lora_a",), kernel[:-1] + ("lora_b",)
        if a not in self.lora or b not in self.lora:
            raise ValueError(f"no LoRA adapter for {'/'.join(kernel[:-1])} in {self.item_dir}")
        return self._read(self.lora[a], index), self._read(self.lora[b], index)

    def merged(self, path: ParamPath, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The canonical tensor at `path` with its LoRA adapter (if it has one) merged in,
        W + (alpha / r) * (A @ B).reshape(W.shape), or only its slice at `index` (slices over
        its leading dims, as jax names a shard): only that part of W is read."""
        kernel = self.read_param(path, index)
        if path[:-1] + ("lora_a",) not in self.lora:
            return kernel
        a, b = self.read_lora(path)  # small: rank x (fan_in + fan_out)
        shape = self.params[path].shape
        return merge_slice(kernel, a, b, lora_scale(self.cfg), shape, index)

    def on_devices(self, path: ParamPath, sharding: jax.sharding.Sharding,
                   dtype: Any = None) -> jax.Array:
        """The merged tensor at `path` (cast to `dtype` when given) as a jax.Array on `sharding`:
        this process reads only the slices its own devices hold, each distinct slice once."""
        return _assemble(self.params[path].shape, sharding,
                         lambda index: _aligned(self.merged(path, index), dtype))

    def stacked_on_devices(self, paths: list[ParamPath], sharding: jax.sharding.Sharding,
                           dtype: Any = None) -> jax.Array:
        """The merged tensors at `paths` (the layers of a `scan_layers` stack) stacked on a new
        leading axis, as a jax.Array on `sharding`: each of this process's shards is filled
        layer by layer from that layer's slice, so no host ever holds more of the stack than its
        devices' shards."""
        shape = (len(paths),) + self.params[paths[0]].shape

        def read(index: tuple[slice, ...]) -> np.ndarray:
            layers = range(len(paths))[index[0]]
            out = None
            for j, i in enumerate(layers):
                tensor = self.merged(paths[i], index[1:])
                if out is None:
                    out = _empty_aligned((len(layers),) + tensor.shape, dtype or tensor.dtype)
                out[j] = tensor
            return out

        return _assemble(shape, sharding, read)

    def lora_kernels(self) -> list[ParamPath]:
        """Canonical kernel paths that carry a LoRA adapter."""
        return [p[:-1] + ("kernel",) for p in self.lora if p[-1] == "lora_a"]

    def params_tree(self) -> dict[str, Any]:
        """The whole canonical tree as nested dicts of numpy arrays (reads every tensor)."""
        tree: dict[str, Any] = {}
        for path in self.params:
            set_leaf(tree, path, self.read_param(path))
        return tree

    def _read(self, stored: StoredTensor, index: tuple[int, ...] = ()) -> np.ndarray:
        try:
            store = _open(self.item_dir, ".".join(stored.leaf), self.use_ocdbt, self.use_zarr3)
            array = _read_by_blocks(store[stored.index + index])
        except Exception as e:  # TensorStore raises many types; name the tensor in every case
            raise ValueError(f"cannot read {'/'.join(stored.leaf)} from {self.item_dir}: "
                             f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        if (array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16) and \
                not np.isfinite(array).all():
            raise ValueError(f"{self.item_dir} holds non-finite values in {'/'.join(stored.leaf)} "
                             "(a diverged run?): refusing it; pick an earlier step")
        return array


def _assemble(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
              read: Any) -> jax.Array:
    """A jax.Array of `shape` on `sharding` whose addressable shards are `read(index)`, each
    distinct index read once (replicas share it)."""
    slices: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in slices:
            slices[key] = read(tuple(index))
        return slices[key]

    return jax.make_array_from_callback(shape, sharding, shard)


def _empty_aligned(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-order array at a 64-byte aligned address: the CPU backend then takes
    it as a device buffer without copying it (an unaligned one is copied, doubling the host
    memory of every tensor being placed)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + _ALIGN, np.uint8)
    start = -buffer.ctypes.data % _ALIGN
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _aligned(array: np.ndarray, dtype: Any = None) -> np.ndarray:
    """`array` cast to `dtype` (when given) in 64-byte aligned memory (see `_empty_aligned`)."""
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    if array.dtype == dtype and array.flags.c_contiguous and array.ctypes.data % _ALIGN == 0:
        return array
    out = _empty_aligned(array.shape, dtype)
    out[...] = array
    return out


def _read_by_blocks(view: ts.TensorStore) -> np.ndarray:
    """Reads a TensorStore view one block of storage chunks at a time, along the axis the view
    crosses most chunks of, into aligned memory: TensorStore decodes every chunk a read touches,
    all at once, so a slice that cuts across chunks (a shard's columns of row-chunked storage)
    read in one go would hold about the whole tensor."""
    out = _empty_aligned(tuple(view.shape), view.dtype.numpy_dtype)
    layout = view.chunk_layout if view.rank else None
    chunk, origin = (layout.read_chunk.shape, layout.grid_origin) if layout else (None, None)
    if chunk is None or origin is None or None in chunk or None in origin:
        out[...] = view.read().result()
        return out
    lo, hi = view.domain.inclusive_min, view.domain.exclusive_max

    def starts(d: int) -> range:
        first = origin[d] + (lo[d] - origin[d]) // chunk[d] * chunk[d]
        return range(first, hi[d], chunk[d])

    axis = max(range(view.rank), key=lambda d: len(starts(d)))
    for start in starts(axis):
        a, b = max(start, lo[axis]), min(start + chunk[axis], hi[axis])
        out[(slice(None),) * axis + (slice(a - lo[axis], b - lo[axis]),)] = \
            view[ts.d[axis][a:b]].read().result()
    return out


def merge_slice(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float,
                shape: tuple[int, ...], index: tuple[slice, ...] = ()) -> np.ndarray:
    """`kernel` (the slice at `index` of a kernel of `shape`) plus its part of scale * A @ B, in
    float32 as `models/lora.merge_lora`: A [*lead, prod(in), r] and B [*lead, r, prod(out)]
    (lead: Mixtral's expert axis) are cut to the slice's rows and columns before the product."""
    lead = a.ndim - 2
    rank = a.shape[-1]
    n_in = next((k for k in range(1, len(shape) - lead)
                 if math.prod(shape[lead:lead + k]) == a.shape[-2]), None)
    if n_in is None or math.prod(shape[lead + n_in:]) != b.shape[-1]:
        raise ValueError(f"LoRA adapters {a.shape} x {b.shape} do not fit a kernel of {shape}")
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    a = a.reshape(shape[:lead + n_in] + (rank,))[index[:lead + n_in]]
    b = b.reshape(shape[:lead] + (rank,) + shape[lead + n_in:])[
        index[:lead] + (slice(None),) + index[lead + n_in:]]
    delta = np.matmul(a.reshape(a.shape[:lead] + (-1, rank)).astype(np.float32),
                      b.reshape(b.shape[:lead] + (rank, -1)).astype(np.float32))
    return (kernel.astype(np.float32) + scale * delta.reshape(kernel.shape)).astype(kernel.dtype)


@functools.lru_cache(maxsize=64)
def _open(item_dir: epath.Path, name: str, use_ocdbt: bool, use_zarr3: bool) -> ts.TensorStore:
    context = _context(use_ocdbt)
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=item_dir,
                                       is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3,
                                       ts_context=context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    return ts.open(spec, context=context).result()


@functools.lru_cache(maxsize=2)
def _context(use_ocdbt: bool) -> ts.Context:
    """One TensorStore context per format, shared by every opened array (one cache pool)."""
    return ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)


def available_steps(workdir: str | os.PathLike) -> list[int]:
    """Finished checkpoint steps of a training workdir (a folder or a bucket URL; folders named
    by their step: unfinished saves and set-aside steps are named otherwise), ascending."""
    folder = storage.path(workdir) / WORKDIR_CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Resolves a model dir, a training workdir (latest step, or `step`) or one of its steps,
    each a local folder or a bucket URL.

    Raises ValueError naming the path for anything that is not a derta_jax checkpoint, a
    missing step (listing the available ones) and tensors that disagree with the model config.
    """
    path = storage.path(path)
    if path.name.isdigit() and path.parent.name == WORKDIR_CHECKPOINTS:
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is step {path.name}, but step={step} was asked for")
        path, step = path.parent.parent, int(path.name)
    if (path / WORKDIR_CHECKPOINTS).is_dir() and (path / WORKDIR_MODEL / CONFIG_FILE).exists():
        return _resolve_workdir(path, step)
    if (path / CONFIG_FILE).exists():
        if step is not None:
            raise ValueError(f"{path} is a model dir; a step only applies to a training workdir")
        if not (path / PARAMS_DIR).is_dir():
            raise ValueError(f"{path} is a model dir without {PARAMS_DIR}/ (a training workdir "
                             "keeps one as model/): pass the workdir itself")
        return _resolve(load_config(path), path, path / PARAMS_DIR, "model_dir", None, (), None)
    raise ValueError(f"{path} is not a derta_jax checkpoint: {_what_it_is(path)}")


def _what_it_is(path: epath.Path) -> str:
    if not path.exists():
        return "it does not exist"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return ("it is a Hugging Face checkpoint; convert it first with "
                "`python -m derta_jax.convert --hf DIR --out MODEL_DIR`")
    return (f"expected a model dir ({CONFIG_FILE} + {PARAMS_DIR}/) or a training workdir "
            f"({WORKDIR_MODEL}/{CONFIG_FILE} + {WORKDIR_CHECKPOINTS}/<step>/)")


def _resolve_workdir(workdir: epath.Path, step: int | None) -> Checkpoint:
    steps = available_steps(workdir)
    if not steps:
        raise ValueError(f"training workdir {workdir} has no finished checkpoint in "
                         f"{WORKDIR_CHECKPOINTS}/")
    if step is not None and step not in steps:
        raise ValueError(f"training workdir {workdir} has no checkpoint for step {step}; "
                         f"available steps: {', '.join(map(str, steps))}")
    cfg = load_config(workdir / WORKDIR_MODEL)
    errors = []
    for s in [step] if step is not None else reversed(steps):
        item = workdir / WORKDIR_CHECKPOINTS / str(s) / STATE_ITEM
        try:
            return _resolve(cfg, workdir / WORKDIR_MODEL, item, "workdir", s, ("params",),
                            ("lora",))
        except ValueError as e:
            if step is not None:
                raise
            errors.append(str(e))
            log.warning("skipping checkpoint %s: %s", item.parent, e)
    raise ValueError(f"training workdir {workdir} has no readable checkpoint: "
                     + "; ".join(errors))


def _stored_leaves(item_dir: epath.Path) -> tuple[dict[ParamPath, Any], bool, bool]:
    """(leaf path -> Orbax ArrayMetadata, use_ocdbt, use_zarr3) of an Orbax PyTree item."""
    try:
        tree = ocp.PyTreeCheckpointer().metadata(item_dir).item_metadata.tree
        flags = json.loads((item_dir / "_METADATA").read_text())
    except Exception as e:  # Orbax raises many types; name the folder in every case
        raise ValueError(f"{item_dir} is not a readable Orbax checkpoint: "
                         f"{type(e).__name__}: {e}") from e
    leaves: dict[ParamPath, Any] = {}

    def walk(node: Any, prefix: ParamPath) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        elif hasattr(node, "shape"):
            leaves[prefix] = node

    walk(tree, ())
    return leaves, bool(flags.get("use_ocdbt", False)), bool(flags.get("use_zarr3", False))


def _locate(canonical: ParamPath, prefix: ParamPath, leaves: dict[ParamPath, Any]
            ) -> StoredTensor | None:
    """The stored leaf of a canonical path, looking through a `scan_layers` stack."""
    if prefix + canonical in leaves:
        meta = leaves[prefix + canonical]
        return StoredTensor(prefix + canonical, (), tuple(meta.shape), np.dtype(meta.dtype))
    if canonical[0].startswith("layers_"):
        stacked = prefix + ("layers",) + canonical[1:]
        if stacked in leaves:
            meta = leaves[stacked]
            return StoredTensor(stacked, (int(canonical[0][len("layers_"):]),),
                                tuple(meta.shape[1:]), np.dtype(meta.dtype))
    return None


def _canonical_shapes_found(leaves: dict[ParamPath, Any], prefix: ParamPath
                            ) -> dict[ParamPath, tuple[int, ...]]:
    """Canonical path -> shape of the stored tensors under `prefix` (a `scan_layers` stack split
    into its layers)."""
    found = {}
    for leaf, meta in leaves.items():
        if leaf[:len(prefix)] != prefix:
            continue
        path, shape = leaf[len(prefix):], tuple(meta.shape)
        if path[:1] == ("layers",):
            found.update({(f"layers_{i}",) + path[1:]: shape[1:] for i in range(shape[0])})
        else:
            found[path] = shape
    return found


def _locate_all(paths: list[ParamPath], prefix: ParamPath, leaves: dict[ParamPath, Any],
                item_dir: epath.Path, cfg: ModelConfig) -> dict[ParamPath, StoredTensor]:
    found = {}
    for path in paths:
        stored = _locate(path, prefix, leaves)
        if stored is None:
            raise ValueError(f"{item_dir} has no tensor for {'/'.join(prefix + path)} "
                             f"(model_type={cfg.model_type!r}, lora_rank={cfg.lora_rank}); is it "
                             "a checkpoint of this model config?")
        found[path] = stored
    return found


def _resolve(cfg: ModelConfig, tokenizer_dir: epath.Path, item_dir: epath.Path, kind: str,
             step: int | None, prefix: ParamPath, lora_prefix: ParamPath | None) -> Checkpoint:
    leaves, use_ocdbt, use_zarr3 = _stored_leaves(item_dir)
    check_params(_canonical_shapes_found(leaves, prefix), cfg, str(item_dir))
    shapes = canonical_shapes(cfg)
    params = _locate_all(list(shapes), prefix, leaves, item_dir, cfg)
    lora = {}
    if lora_prefix is not None and cfg.lora_rank > 0:
        adapters = [p[:-1] + (name,) for p in shapes
                    if p[-1] == "kernel" and p[-2] in cfg.lora_targets
                    for name in ("lora_a", "lora_b")]
        lora = _locate_all(adapters, lora_prefix, leaves, item_dir, cfg)
    return Checkpoint(cfg, tokenizer_dir, item_dir, kind, step, params, lora, use_ocdbt, use_zarr3)
