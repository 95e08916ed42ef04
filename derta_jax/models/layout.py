"""Canonical per-layer trees (`layers_{i}`) <-> one stacked `layers` subtree for nn.scan.

Works on any tree keyed like the parameter tree: params, the `lora` collection, KV caches."""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _layer_keys(tree: dict[str, Any]) -> list[str]:
    indices = sorted(int(m.group(1)) for k in tree if (m := _LAYER_KEY.match(k)))
    if indices != list(range(len(indices))):
        raise ValueError(f"layer keys are not layers_0..layers_{len(indices) - 1}: got indices {indices}")
    return [f"layers_{i}" for i in indices]


def _stack(*xs: Any) -> Any:
    """np.stack for host arrays (so loading stays on the host), jnp.stack otherwise."""
    return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def stack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """Moves layers_0..layers_{N-1} into `layers` with a leading [N] axis on every leaf."""
    if "layers" in tree:
        raise ValueError("tree already has a stacked 'layers' subtree")
    keys = _layer_keys(tree)
    if not keys:
        raise ValueError("tree has no layers_{i} subtrees to stack")
    stacked = jax.tree.map(_stack, *[tree[k] for k in keys])
    rest = {k: v for k, v in tree.items() if k not in keys}
    return {**rest, "layers": stacked}


def unstack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """Splits the stacked `layers` subtree back into layers_0..layers_{N-1}."""
    if "layers" not in tree:
        raise ValueError("tree has no stacked 'layers' subtree to unstack")
    stacked = tree["layers"]
    sizes = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1:
        raise ValueError(f"stacked layer leaves disagree on the layer axis: sizes {sorted(sizes)}")
    (n,) = sizes
    rest = {k: v for k, v in tree.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}}
