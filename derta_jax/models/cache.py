"""The functional KV cache pytree.

    {"index": int32 [] (next write slot), "positions": int32 [B, S], "segment_ids": int32 [B, S],
     "layers_{i}": {"k": [B, K, S, Dh], "v": [B, K, S, Dh]}}     (scan_layers: one stacked "layers")

Keys and values are head-major ([B, K, S, Dh]), so every decode step's attention reads the cache
in the layout its batched matmuls want, without transposing it, and only its written blocks
(models/attention.py cached_attend).

Every forward with a cache writes its L new keys/values, positions and segment ids at `index` and
advances it by L; unwritten slots have segment 0, so the ordinary mask rule ignores them. The caller
keeps index + L <= S (a write past the end would be clamped by dynamic_update_slice).
"""
from __future__ import annotations

import jax.numpy as jnp

from derta_jax.models.config import ModelConfig


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> dict:
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if cfg.scan_layers:
        shape = (cfg.num_layers, *shape)
        layers = {"layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}}
    else:
        layers = {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                  for i in range(cfg.num_layers)}
    return {"index": jnp.zeros((), jnp.int32), "positions": jnp.zeros((batch, max_len), jnp.int32),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), **layers}
