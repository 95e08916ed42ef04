"""LoRA: low-rank adapters in their own `lora` collection, and merging them into the base weights.

The adapter of a projection with kernel [*in_dims, *out_dims] is lora_a [prod(in), r] and
lora_b [r, prod(out)] (Mixtral experts: a leading [E] on both); the effective kernel is
`W + (alpha / r) * (A @ B).reshape(W.shape)`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from derta_jax.models.config import ModelConfig

LORA_COLLECTION = "lora"


def scale(cfg: ModelConfig) -> float:
    return cfg.lora_alpha / cfg.lora_rank


def adapters(module: nn.Module, cfg: ModelConfig, fan_in: int, fan_out: int,
             axes: tuple[str | None, str | None] = (None, None),
             experts: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Declares (or reads) lora_a / lora_b on `module`: A ~ kaiming-uniform like PEFT, B = 0.

    `axes`: the logical names of the adapted kernel's first input and first output dimension.
    A's input and B's output dimension take them, so the adapters and their optimizer state shard
    like the kernel instead of being copied to every device; the rank dimension is `lora_rank`,
    which takes the fsdp axis wherever the other dimension does not (B of q/k/v/gate/up, A of
    o/down: their kernels shard over fsdp only on the embed side)."""
    lead = (experts,) if experts else ()
    lead_axes = ("expert",) if experts else ()
    bound = 1.0 / math.sqrt(fan_in)
    param_dtype = jnp.dtype(cfg.param_dtype)

    def init_a():
        key = module.make_rng("params")
        return jax.random.uniform(key, lead + (fan_in, cfg.lora_rank), param_dtype, -bound, bound)

    a = module.variable(LORA_COLLECTION, "lora_a",
                        nn.with_logical_partitioning(init_a, lead_axes + (axes[0], "lora_rank")))
    b = module.variable(LORA_COLLECTION, "lora_b", nn.with_logical_partitioning(
        lambda: jnp.zeros(lead + (cfg.lora_rank, fan_out), param_dtype),
        lead_axes + ("lora_rank", axes[1])))
    return nn.meta.unbox(a.value), nn.meta.unbox(b.value)


def merge_lora(params: dict[str, Any], lora: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Returns params with every adapter folded into its kernel (W + alpha/r * A @ B)."""
    if cfg.lora_rank <= 0:
        raise ValueError(f"merge_lora needs cfg.lora_rank > 0, got lora_rank={cfg.lora_rank}")
    s = scale(cfg)

    def merge(p: Any, l: Any, path: str) -> Any:
        if not isinstance(l, dict):
            raise ValueError(f"lora tree at {path!r} is not a dict")
        if "lora_a" in l:
            if "kernel" not in p:
                raise ValueError(f"lora adapter at {path!r} has no base kernel in params")
            w = p["kernel"]
            delta = jnp.matmul(l["lora_a"].astype(jnp.float32), l["lora_b"].astype(jnp.float32))
            return {**p, "kernel": (w.astype(jnp.float32) + s * delta.reshape(w.shape)).astype(w.dtype)}
        out = dict(p)
        for k, v in l.items():
            if k not in p:
                raise ValueError(f"lora tree has {path}/{k!r}, which params lack")
            out[k] = merge(p[k], v, f"{path}/{k}")
        return out

    return merge(params, lora, "")
