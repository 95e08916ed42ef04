"""Feed-forward blocks: the SwiGLU MLP and Mixtral's sparse mixture of experts."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from derta_jax.models.config import ModelConfig
from derta_jax.models.projection import ExpertProjection, Projection


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        D, F = cfg.hidden_size, cfg.intermediate_size
        gate = Projection(cfg, (D, F), 1, ("embed", "mlp"), self.deterministic, name="gate_proj")(x_BLD)
        up = Projection(cfg, (D, F), 1, ("embed", "mlp"), self.deterministic, name="up_proj")(x_BLD)
        h_BLF = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Projection(cfg, (F, D), 1, ("mlp", "embed"), self.deterministic, name="down_proj")(h_BLF)


def route(router_logits_BLE: jnp.ndarray, top_k: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Hugging Face Mixtral routing: softmax over all experts (float32), top-k, renormalise.

    Returns (probs [B, L, E], selected one-hot [B, L, K, E], combine weights [B, L, E] that are
    zero for unselected experts)."""
    probs = jax.nn.softmax(router_logits_BLE.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    selected_BLKE = jax.nn.one_hot(top_i, probs.shape[-1], dtype=jnp.float32)
    combine_BLE = jnp.einsum("blke,blk->ble", selected_BLKE, top_w)
    return probs, selected_BLKE, combine_BLE


class MoE(nn.Module):
    """Sparse MoE computed densely (every expert on every token, weighted by the combine tensor).

    Also returns this layer's load-balancing statistics over valid tokens: per-expert counts of
    top-k selections and per-expert sums of router probabilities (`router_loss` in decoder.py)."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD: jnp.ndarray, valid_BL: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
        cfg = self.cfg
        D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        logits = Projection(cfg, (D, E), 1, ("embed", None), name="router")(x_BLD)
        probs, selected, combine_BLE = route(logits, cfg.num_experts_per_tok)

        def experts(name: str, shape: tuple[int, int, int], axes: tuple[str, ...], per_expert: bool):
            return ExpertProjection(cfg, shape, axes, per_expert, self.deterministic, name=name)

        gate = experts("gate_proj", (E, D, F), ("expert", "embed", "mlp"), False)(x_BLD)
        up = experts("up_proj", (E, D, F), ("expert", "embed", "mlp"), False)(x_BLD)
        h_BLEF = jax.nn.silu(gate) * up
        y_BLED = experts("down_proj", (E, F, D), ("expert", "mlp", "embed"), True)(h_BLEF)
        out = jnp.einsum("bled,ble->bld", y_BLED, combine_BLE.astype(y_BLED.dtype))
        valid = valid_BL.astype(jnp.float32)
        stats = {"counts": jnp.einsum("blke,bl->e", selected, valid),
                 "probs": jnp.einsum("ble,bl->e", probs, valid)}
        return out, stats
