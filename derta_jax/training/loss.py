"""The DeRTa loss: MLE on response tokens plus vectorised RTO toward the refusal token.

One forward pass over q ⊕ r̂ gives hidden states at every position; at RTO positions the batch's
`targets` already hold the refusal id, so RTO is plain cross-entropy on those positions
(derta-method.md, "the vectorised form"). The LM head and the cross-entropy run in sequence chunks
under `jax.checkpoint`, so float32 logits exist for one chunk at a time, forward and backward.

Normalisation is expressed as per-token weights computed from the batch before the forward pass:
`token` (the official code) gives every kept supervised token of the global batch weight
1 / count; `sequence` gives every sequence (row, segment) weight 1 / #sequences, split evenly over
its kept tokens. Weights computed on the global batch and summed over micro-batches give exactly the
pooled mean, whatever the micro-batching or device layout.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

NORMALISATIONS = ("token", "sequence")
Batch = Mapping[str, jax.Array]


def rto_keep_mask(rto_mask_BL: jax.Array, segment_ids_BL: jax.Array, rng: jax.Array,
                  keep: float) -> jax.Array:
    """RTO positions that keep their loss this step ("refusal-token dropout").

    Each RTO position is kept with probability `keep`; in every sequence (row, segment) with RTO
    positions, the one with the smallest draw is always kept, so no sequence loses all of them.
    """
    if keep >= 1.0:
        return rto_mask_BL
    B, L = rto_mask_BL.shape
    u_BL = jax.random.uniform(rng, (B, L))
    u_BL = jnp.where(rto_mask_BL, u_BL, 2.0)  # non-RTO positions never win the minimum
    seq_BL = _sequence_index(segment_ids_BL)
    seq_min = jax.ops.segment_min(u_BL.reshape(-1), seq_BL.reshape(-1), num_segments=B * (L + 1))
    is_min_BL = u_BL == seq_min[seq_BL]
    return rto_mask_BL & ((u_BL < keep) | is_min_BL)


def _sequence_index(segment_ids_BL: jax.Array) -> jax.Array:
    """A global id per (row, segment): row * (L + 1) + segment (segments are ids within a row)."""
    B, L = segment_ids_BL.shape
    seg_BL = jnp.clip(segment_ids_BL, 0, L)
    return jnp.arange(B, dtype=jnp.int32)[:, None] * (L + 1) + seg_BL


def loss_weights(batch: Batch, *, rto_keep: float, rng: jax.Array,
                 normalisation: str = "token") -> tuple[jax.Array, jax.Array]:
    """Per-token loss weights [B, L] (summing to 1 when anything is supervised) and the kept mask.

    Call on the global batch: the sums here are the pooled counts across micro-batches and hosts.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"loss.normalisation={normalisation!r}: expected one of {NORMALISATIONS}")
    loss_mask = batch["loss_mask"].astype(bool)
    rto_mask = batch["rto_mask"].astype(bool) & loss_mask
    kept_BL = (loss_mask & ~rto_mask) | rto_keep_mask(rto_mask, batch["segment_ids"], rng, rto_keep)
    kept_f = kept_BL.astype(jnp.float32)
    if normalisation == "token":
        return kept_f / jnp.maximum(kept_f.sum(), 1.0), kept_BL
    B, L = kept_BL.shape
    seq_BL = _sequence_index(batch["segment_ids"])
    per_seq = jax.ops.segment_sum(kept_f.reshape(-1), seq_BL.reshape(-1), num_segments=B * (L + 1))
    num_seqs = jnp.maximum((per_seq > 0).sum(), 1)
    return kept_f / jnp.maximum(per_seq[seq_BL], 1.0) / num_seqs, kept_BL


def chunked_ce_sums(hidden_BLD: jax.Array, lm_head_DV: jax.Array, batch: Batch,
                    weights_BL: jax.Array, *, chunk_size: int) -> dict[str, jax.Array]:
    """Weighted cross-entropy and metric sums, computed over sequence chunks of `chunk_size`.

    Returns sums (not means) so callers can pool them: `weighted` (the loss), `ce/mle`, `ce/rto`,
    `correct/rto` (argmax == target at RTO positions), `count/mle`, `count/rto`, `count/rto_kept`.
    """
    B, L, D = hidden_BLD.shape
    c = min(chunk_size, L)
    pad = -L % c
    mle_BL = batch["loss_mask"].astype(bool) & ~batch["rto_mask"].astype(bool)
    rto_BL = batch["loss_mask"].astype(bool) & batch["rto_mask"].astype(bool)
    per_token = dict(targets=batch["targets"].astype(jnp.int32), w=weights_BL.astype(jnp.float32),
                     mle=mle_BL.astype(jnp.float32), rto=rto_BL.astype(jnp.float32))
    padded = {k: jnp.pad(v, ((0, 0), (0, pad))) for k, v in per_token.items()}
    hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
    n = (L + pad) // c
    chunks = {k: v.reshape(B, n, c).swapaxes(0, 1) for k, v in padded.items()}
    chunks["h"] = hidden_BLD.reshape(B, n, c, D).swapaxes(0, 1)
    w_DV = lm_head_DV.astype(hidden_BLD.dtype)

    @jax.checkpoint
    def chunk_sums(ch):
        logits_BcV = jnp.einsum("bcd,dv->bcv", ch["h"], w_DV, preferred_element_type=jnp.float32)
        lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        target_Bc = jnp.take_along_axis(logits_BcV, ch["targets"][..., None], axis=-1)[..., 0]
        ce_Bc = lse_Bc - target_Bc
        correct_Bc = (jnp.argmax(logits_BcV, axis=-1) == ch["targets"]).astype(jnp.float32)
        return {"weighted": (ce_Bc * ch["w"]).sum(), "ce/mle": (ce_Bc * ch["mle"]).sum(),
                "ce/rto": (ce_Bc * ch["rto"]).sum(), "correct/rto": (correct_Bc * ch["rto"]).sum()}

    def body(acc, ch):
        return jax.tree.map(jnp.add, acc, chunk_sums(ch)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, {k: zero for k in ("weighted", "ce/mle", "ce/rto", "correct/rto")},
                           chunks)
    kept_rto = ((weights_BL > 0) & rto_BL).astype(jnp.float32).sum()
    return {**sums, "count/mle": per_token["mle"].sum(), "count/rto": per_token["rto"].sum(),
            "count/rto_kept": kept_rto}


def metrics_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from pooled sums: loss/mle, loss/rto (over all RTO positions), rto/accuracy, tokens/*."""
    return {
        "loss/mle": sums["ce/mle"] / jnp.maximum(sums["count/mle"], 1.0),
        "loss/rto": sums["ce/rto"] / jnp.maximum(sums["count/rto"], 1.0),
        "rto/accuracy": sums["correct/rto"] / jnp.maximum(sums["count/rto"], 1.0),
        "tokens/mle": sums["count/mle"],
        "tokens/rto": sums["count/rto"],
        "tokens/rto_kept": sums["count/rto_kept"],
    }


def derta_loss(hidden_BLD: jax.Array, lm_head_DV: jax.Array, batch: Batch, *, rto_keep: float,
               rng: jax.Array, chunk_size: int = 256,
               normalisation: str = "token") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DeRTa loss of one (global) batch: `(loss, aux)`.

    `loss` is the weighted mean cross-entropy over MLE tokens and kept RTO tokens (see module
    docstring); aux holds loss/mle and loss/rto (means over all MLE / RTO positions, kept or not),
    rto/accuracy and the token counts tokens/mle, tokens/rto, tokens/rto_kept.
    """
    weights_BL, _ = loss_weights(batch, rto_keep=rto_keep, rng=rng, normalisation=normalisation)
    sums = chunked_ce_sums(hidden_BLD, lm_head_DV, batch, weights_BL, chunk_size=chunk_size)
    return sums["weighted"], metrics_from_sums(sums)
