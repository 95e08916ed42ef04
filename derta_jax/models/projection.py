"""A linear projection with a multi-dimensional kernel, logical axis names and an optional LoRA."""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from derta_jax.models import lora
from derta_jax.models.config import ModelConfig


def _kernel_init(n_in: int, ndim: int, batch_axis: tuple[int, ...] = ()) -> nn.initializers.Initializer:
    first = len(batch_axis)
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(first, first + n_in)),
        out_axis=tuple(range(first + n_in, ndim)), batch_axis=batch_axis)


def uses_lora(cfg: ModelConfig, name: str | None) -> bool:
    return cfg.lora_rank > 0 and name in cfg.lora_targets


class Projection(nn.Module):
    """y = x @ W over the last `n_in` axes of x, W of shape [*in, *out]; plus the LoRA delta
    (alpha/r) * dropout(x) @ A @ B when this module's name is a LoRA target."""

    cfg: ModelConfig
    shape: tuple[int, ...]
    n_in: int
    axes: tuple[str | None, ...]
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            _kernel_init(self.n_in, len(self.shape)), self.axes), self.shape, jnp.dtype(cfg.param_dtype))
        x = x.astype(dtype)
        fan_in, fan_out = math.prod(self.shape[:self.n_in]), math.prod(self.shape[self.n_in:])
        lead = x.shape[:x.ndim - self.n_in]
        # One 2-D matmul [tokens, fan_in] @ [fan_in, fan_out]: XLA's CPU backend then runs the
        # gradient dots without the layout transposes a multi-axis dot_general costs it.
        h = x.reshape(-1, fan_in)
        y = (h @ kernel.astype(dtype).reshape(fan_in, fan_out)).reshape(*lead, *self.shape[self.n_in:])
        if not uses_lora(cfg, self.name):
            return y
        a, b = lora.adapters(self, cfg, fan_in, fan_out, (self.axes[0], self.axes[self.n_in]))
        h = nn.Dropout(cfg.lora_dropout)(h, deterministic=self.deterministic)
        delta = (h @ a.astype(dtype)) @ b.astype(dtype)
        return y + (lora.scale(cfg) * delta).reshape(y.shape).astype(dtype)


class ExpertProjection(nn.Module):
    """Per-expert kernels [E, in, out] applied densely to every token: x [B, L, in] (or
    [B, L, E, in] when `per_expert_input`) -> [B, L, E, out]; LoRA adapters carry a leading [E]."""

    cfg: ModelConfig
    shape: tuple[int, int, int]
    axes: tuple[str | None, ...]
    per_expert_input: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            _kernel_init(1, 3, batch_axis=(0,)), self.axes), self.shape, jnp.dtype(cfg.param_dtype))
        x = x.astype(dtype)
        spec = "blei" if self.per_expert_input else "bli"
        y = jnp.einsum(f"{spec},eio->bleo", x, kernel.astype(dtype))
        if not uses_lora(cfg, self.name):
            return y
        a, b = lora.adapters(self, cfg, self.shape[1], self.shape[2], self.axes[1:],
                             experts=self.shape[0])
        h = nn.Dropout(cfg.lora_dropout)(x, deterministic=self.deterministic)
        delta = jnp.einsum("bler,ero->bleo", jnp.einsum(f"{spec},eir->bler", h, a.astype(dtype)),
                           b.astype(dtype))
        return y + (lora.scale(cfg) * delta).astype(dtype)
