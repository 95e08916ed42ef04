"""One Flax Linen decoder for LLaMA-3(.1), Mistral and Mixtral (see docs/architecture.md)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from derta_jax.models import rope
from derta_jax.models.attention import Attention, attention_mask
from derta_jax.models.config import ModelConfig
from derta_jax.models.lora import LORA_COLLECTION
from derta_jax.models.mlp import MLP, MoE
from derta_jax.models.projection import Projection

_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back, times the learned scale (as transformers does)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (cfg.hidden_size,), jnp.dtype(cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        dtype = jnp.dtype(cfg.dtype)
        return scale.astype(dtype) * normed.astype(dtype)


class DecoderLayer(nn.Module):
    """Pre-norm attention + (MLP or MoE). Signature (carry, xs) -> (carry, ys) for nn.scan."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD: jnp.ndarray, shared: dict, layer_cache: dict | None
                 ) -> tuple[jnp.ndarray, tuple[dict | None, dict | None]]:
        cfg = self.cfg
        h, new_cache = Attention(cfg, self.deterministic, name="attn")(
            RMSNorm(cfg, name="input_norm")(x_BLD), shared, layer_cache)
        x_BLD = x_BLD + h
        y = RMSNorm(cfg, name="post_attn_norm")(x_BLD)
        stats = None
        if cfg.is_moe:
            y, stats = MoE(cfg, self.deterministic, name="moe")(y, shared["valid"])
        else:
            y = MLP(cfg, self.deterministic, name="mlp")(y)
        x_BLD = nn.with_logical_constraint(x_BLD + y, ("batch", "length", "embed"))
        return x_BLD, (stats, new_cache)


def _layer_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.remat == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def router_loss(stats: dict | None, valid_BL: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """transformers' `load_balancing_loss_func` (without router_aux_loss_coef): counts and
    probabilities pooled over layers and valid tokens, E * sum_e f_e * P_e."""
    if stats is None:
        return jnp.zeros((), jnp.float32)
    rows = cfg.num_layers * jnp.maximum(jnp.sum(valid_BL.astype(jnp.float32)), 1.0)
    tokens_per_expert = stats["counts"] / rows
    prob_per_expert = stats["probs"] / rows
    return cfg.num_experts * jnp.sum(tokens_per_expert * prob_per_expert)


class Decoder(nn.Module):
    """tokens/positions/segment_ids [B, L] -> (logits [B, L, V] float32 or hidden [B, L, D], aux)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BL: jnp.ndarray, positions_BL: jnp.ndarray,
                 segment_ids_BL: jnp.ndarray, cache: dict | None = None,
                 return_hidden: bool = False, deterministic: bool = True
                 ) -> tuple[jnp.ndarray, dict[str, Any]]:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                         param_dtype=jnp.dtype(cfg.param_dtype), name="embed_tokens",
                         embedding_init=nn.with_logical_partitioning(  # HF initializer_range
                             nn.initializers.normal(0.02), ("vocab", "embed")))
        x = nn.with_logical_constraint(embed(tokens_BL), ("batch", "length", "embed"))
        shared, k_pos, k_seg = self._shared_inputs(positions_BL, segment_ids_BL, cache)
        x, stats, layer_caches = self._layers(x, shared, cache, deterministic)
        x = RMSNorm(cfg, name="final_norm")(x)
        aux = {"router_loss": router_loss(stats, shared["valid"], cfg), "cache": None}
        if cache is not None:
            aux["cache"] = {"index": cache["index"] + tokens_BL.shape[1], "positions": k_pos,
                            "segment_ids": k_seg, **layer_caches}
        if return_hidden:
            return x, aux
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Projection(cfg, (cfg.hidden_size, cfg.vocab_size), 1, ("embed", "vocab"),
                                name="lm_head")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab")), aux

    def _shared_inputs(self, positions_BL, segment_ids_BL, cache):
        """RoPE tables, the attention mask over the keys (the cache's, updated, when present)."""
        cfg = self.cfg
        positions_BL = positions_BL.astype(jnp.int32)
        segment_ids_BL = segment_ids_BL.astype(jnp.int32)
        cos, sin = rope.cos_sin(positions_BL, rope.inverse_frequencies(cfg))
        index = jnp.zeros((), jnp.int32)
        k_pos, k_seg = positions_BL, segment_ids_BL
        if cache is not None:
            index = cache["index"]
            k_pos = lax.dynamic_update_slice(cache["positions"], positions_BL, (0, index))
            k_seg = lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BL, (0, index))
        mask = attention_mask(positions_BL, segment_ids_BL, k_pos, k_seg, cfg.sliding_window)
        shared = {"cos": cos, "sin": sin, "mask": mask, "index": index, "valid": segment_ids_BL != 0}
        return shared, k_pos, k_seg

    def _layers(self, x, shared, cache, deterministic):
        """Runs the layers unrolled (layers_{i}) or under nn.scan (one stacked `layers`)."""
        cfg = self.cfg
        layer_class = _layer_class(cfg)
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_class, variable_axes={"params": 0, LORA_COLLECTION: 0},
                split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, 0),
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            layer_cache = None if cache is None else cache["layers"]
            x, (stats, new_cache) = scanned(cfg, deterministic, name="layers")(x, shared, layer_cache)
            if stats is not None:
                stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
            return x, stats, {"layers": new_cache}
        all_stats, new_caches = [], {}
        for i in range(cfg.num_layers):
            name = f"layers_{i}"
            layer_cache = None if cache is None else cache[name]
            x, (stats, new_caches[name]) = layer_class(cfg, deterministic, name=name)(
                x, shared, layer_cache)
            all_stats.append(stats)
        stats = None if not cfg.is_moe else jax.tree.map(lambda *s: sum(s), *all_stats)
        return x, stats, new_caches


def lm_head_weight(params: dict[str, Any], cfg: ModelConfig) -> jnp.ndarray:
    """The output projection [D, V]: the embedding transposed when embeddings are tied."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def init_boxed(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh variables with their logical axis names (what sharding rules read)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return dict(Decoder(cfg).init({"params": rng}, tokens, tokens, tokens + 1))


def init_variables(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh, unboxed variables: {"params": ...} plus {"lora": ...} when cfg.lora_rank > 0."""
    return nn.meta.unbox(init_boxed(cfg, rng))
