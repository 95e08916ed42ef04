"""Rotary position embeddings in Hugging Face's rotate-half convention, with LLaMA-3.1 scaling."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from derta_jax.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The [head_dim / 2] float32 inverse frequencies, computed as transformers does.

    Without scaling: 1 / theta^(2i / head_dim). With `rope_type: llama3`: low frequencies (long
    wavelengths) divided by `factor`, high ones kept, the band between interpolated smoothly.
    """
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions_BL: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables [B, L, head_dim] in float32 for explicit position ids."""
    freqs_BLF = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_BLH = jnp.concatenate([freqs_BLF, freqs_BLF], axis=-1)
    return jnp.cos(emb_BLH), jnp.sin(emb_BLH)


def apply_rope(x_BLNH: jnp.ndarray, cos_BLH: jnp.ndarray, sin_BLH: jnp.ndarray) -> jnp.ndarray:
    """x * cos + rotate_half(x) * sin, computed in float32 and cast back to x's dtype."""
    x = x_BLNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BLH[:, :, None, :] + rotated * sin_BLH[:, :, None, :]
    return out.astype(x_BLNH.dtype)
