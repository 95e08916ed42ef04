"""Throughput accounting: model FLOPs per token and a measured matmul peak, for perf/mfu."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from derta_jax.models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters touched by matmuls per token: layers (active experts only) plus the LM head."""
    D, F, H, K, Dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim)
    attn = D * (H + 2 * K) * Dh + H * Dh * D
    mlp = 3 * D * F * (cfg.num_experts_per_tok if cfg.is_moe else 1)
    router = D * cfg.num_experts if cfg.is_moe else 0
    return cfg.num_layers * (attn + mlp + router) + D * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N (forward + backward matmuls) + attention scores and values, 12 L H Dh S (PaLM, App. B)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def measure_matmul_flops(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul on the first device: the attainable peak used for MFU. The
    fastest of `repeats` timed calls, since other work on a shared host only slows calls down."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    return 2.0 * n ** 3 / fastest
