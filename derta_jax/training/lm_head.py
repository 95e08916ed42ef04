"""The LM head over the positions that carry loss only, in sequence chunks.

The LM head and the softmax over the vocabulary are the one part of a step whose cost is per
position whatever the position is for; prompt tokens and padding need hidden states, not logits.
So each row's positions with loss move to its front (a stable sort: their order is kept), the
rows are cut into chunks of `chunk_size` positions, and a chunk past the fullest row's count is
skipped (`lax.cond`, forward and backward). Positions without loss that share a chunk with ones
that have it get a zero hidden state, so whatever they hold (even NaN) never reaches a sum. Each
chunk runs under `jax.checkpoint`, so float32 logits exist for one chunk at a time. Rows are
sorted within themselves: the batch dimension keeps its sharding, nothing crosses devices.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

Chunk = dict[str, jax.Array]


def _chunks(hidden_BLD: jax.Array, needed_BL: jax.Array, per_token: Mapping[str, jax.Array],
            chunk_size: int) -> tuple[Chunk, jax.Array, jax.Array]:
    """(chunks [n, B, c, ...] with "h" and the per-token arrays, sorted with needed positions
    first; whether each chunk holds a needed position [n]; the sort order [B, L])."""
    B, L, D = hidden_BLD.shape
    c = min(chunk_size, L)
    pad = -L % c
    n = (L + pad) // c
    order_BL = jnp.argsort(jnp.logical_not(needed_BL).astype(jnp.int8), axis=1, stable=True)
    needed_sorted = jnp.take_along_axis(needed_BL, order_BL, axis=1)
    h = jnp.take_along_axis(hidden_BLD, order_BL[..., None], axis=1)
    h = jnp.where(needed_sorted[..., None], h, jnp.zeros((), h.dtype))
    arrays = {k: jnp.take_along_axis(v, order_BL, axis=1) for k, v in per_token.items()}

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(B, n, c, *x.shape[2:]).swapaxes(0, 1)

    chunks = {k: split(v) for k, v in arrays.items()}
    chunks["h"] = split(h)
    fullest = needed_BL.sum(axis=1).max()
    active = jnp.arange(n) * c < fullest
    return chunks, active, order_BL


def sum_chunks(fn: Callable[[Chunk], dict[str, jax.Array]], hidden_BLD: jax.Array,
               needed_BL: jax.Array, per_token: Mapping[str, jax.Array], chunk_size: int,
               keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """The sum over chunks of `fn(chunk)` (a dict of float32 scalars named `keys`), computed
    only for chunks that hold a needed position. `fn` sees `chunk["h"]` [B, c, D] and each
    per-token array [B, c] (positions re-ordered: only sums over them are meaningful)."""
    chunks, active, _ = _chunks(hidden_BLD, needed_BL, per_token, chunk_size)
    zero = {k: jnp.zeros((), jnp.float32) for k in keys}
    run = jax.checkpoint(fn)

    def body(acc, xs):
        ch, on = xs
        sums = jax.lax.cond(on, run, lambda _: zero, ch)
        return jax.tree.map(jnp.add, acc, sums), None

    sums, _ = jax.lax.scan(body, zero, (chunks, active))
    return sums


def map_chunks(fn: Callable[[Chunk], jax.Array], hidden_BLD: jax.Array, needed_BL: jax.Array,
               per_token: Mapping[str, jax.Array], chunk_size: int) -> jax.Array:
    """`fn(chunk)` -> float32 [B, c] per position, back in the original order [B, L]; 0 at the
    positions that are not needed (and in skipped chunks)."""
    B, L, _ = hidden_BLD.shape
    chunks, active, order_BL = _chunks(hidden_BLD, needed_BL, per_token, chunk_size)
    run = jax.checkpoint(fn)
    c = chunks["h"].shape[2]
    zeros = jnp.zeros((B, c), jnp.float32)

    def one(xs):
        ch, on = xs
        return jax.lax.cond(on, run, lambda _: zeros, ch)

    sorted_BL = jax.lax.map(one, (chunks, active)).swapaxes(0, 1).reshape(B, -1)[:, :L]
    needed_sorted = jnp.take_along_axis(needed_BL, order_BL, axis=1)
    sorted_BL = jnp.where(needed_sorted, sorted_BL, 0.0)
    return jnp.zeros((B, L), jnp.float32).at[jnp.arange(B)[:, None], order_BL].set(sorted_BL)
