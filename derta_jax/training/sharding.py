"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place tensors on it.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, ...; see docs/architecture.md);
`LOGICAL_RULES` maps them onto mesh axes. A dimension that a mesh axis does not divide stays
replicated along it, so tiny test models run on any mesh shape.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Tried in order; a mesh axis already used by an earlier dimension of the same tensor is skipped.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("expert", None),
    ("layers", None),
    ("length", None),
    ("lora_rank", "fsdp"),  # last: only where the adapter's other dimension left fsdp unused
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size; -1 = the devices left over (at most one -1)
    fsdp: int = 1  # fully-sharded data-parallel axis (params sharded over "embed")
    tensor: int = 1  # tensor-parallel axis (heads, mlp, vocab)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves the one -1 axis; raises ValueError naming `mesh.<axis>` when sizes do not fit."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{a}={s}: expected a positive size or -1")
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"({fixed}); set mesh.{free[0]} explicitly")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} but there are "
                         f"{num_devices} devices ({sizes})")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide evenly."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if mesh.shape[a] > 1)
        while kept and dim % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) abstract arrays.

    Returns the tree unboxed (one NamedSharding per array); unannotated leaves are replicated.
    """
    logical = nn.get_partition_spec(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)

    def one(spec: P, leaf: Any) -> NamedSharding:
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else P()
        return NamedSharding(mesh, _fit(mesh_spec, tuple(leaf.shape), mesh))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over (data, fsdp), sequence replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this host's rows (the host's share of the global batch)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def local_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows of the global batch (process-major devices)."""
    n, i = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
