"""Grouped-query attention with RoPE, the mask rule of docs/architecture.md and a KV cache."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from derta_jax.models import rope
from derta_jax.models.config import ModelConfig
from derta_jax.models.projection import Projection


def attention_mask(q_pos_BL: jnp.ndarray, q_seg_BL: jnp.ndarray, k_pos_BS: jnp.ndarray,
                   k_seg_BS: jnp.ndarray, window: int | None) -> jnp.ndarray:
    """[B, 1, L, S] bool: query i sees key j when seg[j] == seg[i] != 0, pos[j] <= pos[i] and,
    with a sliding window W, pos[i] - pos[j] < W."""
    q_pos, q_seg = q_pos_BL[:, :, None], q_seg_BL[:, :, None]
    k_pos, k_seg = k_pos_BS[:, None, :], k_seg_BS[:, None, :]
    mask = (k_seg == q_seg) & (q_seg != 0) & (k_pos <= q_pos)
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask[:, None, :, :]


def implementation(cfg: ModelConfig) -> str:
    """The kernel of forwards without a cache: 'cudnn' when asked for, or on GPU in bfloat16
    under 'auto'; the XLA kernel otherwise. (With a cache, attention is `cached_attend`.)"""
    if cfg.attention_impl not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention_impl={cfg.attention_impl!r}: expected auto, xla or cudnn")
    if cfg.attention_impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and cfg.dtype == "bfloat16" else "xla"
    return cfg.attention_impl


def attend(q_BLHD: jnp.ndarray, k_BSKD: jnp.ndarray, v_BSKD: jnp.ndarray, mask_B1LS: jnp.ndarray,
           impl: str, block: int) -> jnp.ndarray:
    """Softmax attention. With `block` > 0, the XLA kernel and no cache (S == L), query block i
    is computed against key blocks 0..i only: the blocks above the diagonal are fully masked when
    each segment's tokens are contiguous with increasing positions (the batch contract), so the
    result is the same at about half the work of the full [L, L] scores for long rows."""
    L = q_BLHD.shape[1]
    if block <= 0 or impl != "xla" or L <= block or k_BSKD.shape[1] != L:
        return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_B1LS,
                                            implementation=impl)
    outs = [jax.nn.dot_product_attention(q_BLHD[:, s:s + block], k_BSKD[:, :s + block],
                                         v_BSKD[:, :s + block],
                                         mask=mask_B1LS[:, :, s:s + block, :s + block],
                                         implementation=impl)
            for s in range(0, L, block)]
    return jnp.concatenate(outs, axis=1)


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a row with no visible key stays finite


def cached_attend(q_BLHD: jnp.ndarray, k_BKSD: jnp.ndarray, v_BKSD: jnp.ndarray,
                  mask_B1LS: jnp.ndarray, filled: jnp.ndarray | int, block: int = 0) -> jnp.ndarray:
    """Softmax attention over a head-major cache, the XLA kernel's arithmetic (float32 scores
    and softmax): the query heads of each KV head form one batched matmul with its keys.

    Only the first `filled` slots (traced; every slot after them is unwritten) are read: with
    `block` > 0 dividing S, the cache is read `block` slots at a time, for ceil(filled / block)
    blocks, with the online softmax of flash attention, so a decode step costs the filled part of
    the cache instead of all of it; otherwise all S slots are read at once."""
    B, L, H, Dh = q_BLHD.shape
    K, S = k_BKSD.shape[1], k_BKSD.shape[2]
    q = q_BLHD.reshape(B, L, K, H // K, Dh)

    def scores(k, mask):  # -> [B, K, G, L, s] float32, masked
        raw = jnp.einsum("blkgd,bksd->bkgls", q, k, preferred_element_type=jnp.float32)
        return jnp.where(mask[:, :, None], raw * (Dh ** -0.5), jnp.float32(_MASKED))

    if block <= 0 or block >= S or S % block:
        probs = jax.nn.softmax(scores(k_BKSD, mask_B1LS), axis=-1).astype(v_BKSD.dtype)
        return jnp.einsum("bkgls,bksd->blkgd", probs, v_BKSD).reshape(B, L, H, Dh)

    def one_block(j, carry):
        top, total, acc = carry  # running max, softmax denominator, weighted values
        start = j * block
        s = scores(lax.dynamic_slice_in_dim(k_BKSD, start, block, axis=2),
                   lax.dynamic_slice_in_dim(mask_B1LS, start, block, axis=3))
        new_top = jnp.maximum(top, jnp.max(s, axis=-1))
        p = jnp.exp(s - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        v = lax.dynamic_slice_in_dim(v_BKSD, start, block, axis=2)
        pv = jnp.einsum("bkgls,bksd->bkgld", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_top, total * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + pv

    shape = (B, K, H // K, L)
    init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, Dh), jnp.float32))
    _, total, acc = lax.fori_loop(0, (filled + block - 1) // block, one_block, init)
    out = (acc / total[..., None]).astype(v_BKSD.dtype)  # [B, K, G, L, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, L, H, Dh)


class Attention(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD: jnp.ndarray, shared: dict, layer_cache: dict | None
                 ) -> tuple[jnp.ndarray, dict | None]:
        """`shared` holds cos/sin [B, L, Dh], the mask [B, 1, L, S] and the cache write index."""
        cfg = self.cfg
        D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(name: str, shape: tuple[int, ...], n_in: int, axes: tuple[str, ...]) -> Projection:
            return Projection(cfg, shape, n_in, axes, self.deterministic, name=name)

        q = proj("q_proj", (D, H, Dh), 1, ("embed", "heads", "head_dim"))(x_BLD)
        k = proj("k_proj", (D, K, Dh), 1, ("embed", "kv_heads", "head_dim"))(x_BLD)
        v = proj("v_proj", (D, K, Dh), 1, ("embed", "kv_heads", "head_dim"))(x_BLD)
        q = rope.apply_rope(q, shared["cos"], shared["sin"])
        k = rope.apply_rope(k, shared["cos"], shared["sin"])
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        new_cache = None
        if layer_cache is None:
            out_BLHD = attend(q, k, v, shared["mask"], implementation(cfg), cfg.attention_block)
        else:
            start = (0, 0, shared["index"], 0)
            new_cache = {name: lax.dynamic_update_slice(
                layer_cache[name], x.swapaxes(1, 2).astype(layer_cache[name].dtype), start)
                for name, x in (("k", k), ("v", v))}
            out_BLHD = cached_attend(q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype),
                                     shared["mask"], shared["index"] + q.shape[1], cfg.attention_block)
        out_BLHD = nn.with_logical_constraint(out_BLHD, ("batch", "length", "heads", "head_dim"))
        out = proj("o_proj", (H, Dh, D), 2, ("heads", "head_dim", "embed"))(out_BLHD)
        return out, new_cache
