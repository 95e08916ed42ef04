"""The DeRTa loss: MLE on response tokens plus vectorised RTO toward the refusal token.

One forward pass over q ⊕ r̂ gives hidden states at every position; at RTO positions the batch's
`targets` already hold the refusal id, so RTO is plain cross-entropy on those positions
(derta-method.md, "the vectorised form"). The LM head and the cross-entropy run in sequence chunks
under `jax.checkpoint`, so float32 logits exist for one chunk at a time, forward and backward.

Refusal-token dropout (`rto_keep` < 1) keeps the loss of only some RTO positions each step:
- `official` (the authors' full-parameter script): in every row of length L, max(1, ceil(rto_keep * L))
  distinct positions of the whole row (prompt and padding included) are drawn, and the RTO positions
  among them keep their loss: about `rto_keep` of them on average, a short response often none.
- `at_least_one`: each RTO position is kept with probability `rto_keep`, and in every sequence
  (row, segment) the position with the smallest draw is always kept.

Normalisation is expressed as per-token weights computed from the batch before the forward pass:
`token` (the official code) gives every kept supervised token of the global batch weight
1 / count; `sequence` gives every sequence (row, segment) weight 1 / #sequences, split evenly over
its kept tokens. Weights computed on the global batch and summed over micro-batches give exactly the
pooled mean, whatever the micro-batching or device layout. `loss_sums` is the one loss function:
the train step pools its sums over micro-batches, `derta_loss` turns them into `(loss, aux)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp

from derta_jax.training.preference import OBJECTIVES

NORMALISATIONS = ("token", "sequence")
KEEP_RULES = ("official", "at_least_one")
SUM_KEYS = ("loss", "weighted", "ce/mle", "ce/rto", "correct/rto", "count/mle", "count/rto",
            "count/rto_kept", "router_loss")
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    rto_keep: float = 1.0  # share of RTO positions keeping their loss per step (official full-param: 0.05)
    rto_keep_rule: str = "official"  # official: ceil(rto_keep * L) positions per row | at_least_one
    normalisation: str = "token"  # token: one mean over the global batch (official) | sequence
    chunk_size: int = 256  # sequence chunk for the LM head + cross-entropy (memory vs speed)
    router_coef: float = 0.0  # MoE load-balancing loss weight (transformers adds none by default)
    # the objective (training/preference.py): derta (this module) | dpo | ipo | simpo | constrained_sft
    objective: str = "derta"
    beta: float = 0.1  # dpo/ipo/simpo: β (TRL's default 0.1; SimPO's paper 2.0); constrained_sft: base β
    label_smoothing: float = 0.0  # dpo/simpo: ε, the share of pairs taken as mislabelled (cDPO)
    simpo_gamma: float = 0.5  # simpo: the target reward margin γ (TRL's default)
    csft_first_token_factor: float = 5.0  # constrained_sft: β_1 = β * this (Qi et al.'s code: 5)
    csft_bias_factor: float = 20.0  # constrained_sft: β_t = β * this for 2 <= t <= csft_bias_length
    csft_bias_length: int = 5  # constrained_sft: tokens with the larger β (Qi et al.: 5)

    def __post_init__(self):
        _check(0.0 < self.rto_keep <= 1.0, "rto_keep", self.rto_keep, "in (0, 1]")
        _check(self.rto_keep_rule in KEEP_RULES, "rto_keep_rule", self.rto_keep_rule,
               f"one of {KEEP_RULES}")
        _check(self.normalisation in NORMALISATIONS, "normalisation", self.normalisation,
               f"one of {NORMALISATIONS}")
        _check(self.chunk_size >= 1, "chunk_size", self.chunk_size, ">= 1")
        _check(self.router_coef >= 0.0, "router_coef", self.router_coef, ">= 0")
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"one of {OBJECTIVES}")
        _check(self.beta > 0.0, "beta", self.beta, "> 0")
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing,
               "in [0, 0.5)")
        _check(self.csft_first_token_factor > 0, "csft_first_token_factor",
               self.csft_first_token_factor, "> 0")
        _check(self.csft_bias_factor > 0, "csft_bias_factor", self.csft_bias_factor, "> 0")
        _check(self.csft_bias_length >= 0, "csft_bias_length", self.csft_bias_length, ">= 0")


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: expected {expected}")


def official_keep_count(length: int, rto_keep: float) -> int:
    """Positions drawn per row of `length` tokens: max(1, ceil(rto_keep * length)) (official: n/20)."""
    return max(1, math.ceil(rto_keep * length - 1e-9))


def rto_keep_official(rto_mask_BL: jax.Array, rng: jax.Array, keep: float) -> jax.Array:
    """The official rule: RTO positions among max(1, ceil(keep * L)) distinct positions drawn
    uniformly from each whole row."""
    if keep >= 1.0:
        return rto_mask_BL
    B, L = rto_mask_BL.shape
    _, drawn_Bk = jax.lax.top_k(jax.random.uniform(rng, (B, L)), official_keep_count(L, keep))
    drawn_BL = jnp.zeros((B, L), bool).at[jnp.arange(B)[:, None], drawn_Bk].set(True)
    return rto_mask_BL & drawn_BL


def rto_keep_mask(rto_mask_BL: jax.Array, segment_ids_BL: jax.Array, rng: jax.Array,
                  keep: float) -> jax.Array:
    """The `at_least_one` rule: each RTO position is kept with probability `keep`; in every
    sequence (row, segment) with RTO positions, the one with the smallest draw is always kept."""
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


def loss_weights(batch: Batch, cfg: LossConfig, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token loss weights [B, L] (summing to 1 when anything is supervised) and the kept mask.

    Call on the global batch: the sums here are the pooled counts across micro-batches and hosts.
    """
    loss_mask = batch["loss_mask"].astype(bool)
    rto_mask = batch["rto_mask"].astype(bool) & loss_mask
    if cfg.rto_keep_rule == "official":
        kept_rto = rto_keep_official(rto_mask, rng, cfg.rto_keep)
    else:
        kept_rto = rto_keep_mask(rto_mask, batch["segment_ids"], rng, cfg.rto_keep)
    kept_BL = (loss_mask & ~rto_mask) | kept_rto
    kept_f = kept_BL.astype(jnp.float32)
    if cfg.normalisation == "token":
        return kept_f / jnp.maximum(kept_f.sum(), 1.0), kept_BL
    B, L = kept_BL.shape
    seq_BL = _sequence_index(batch["segment_ids"])
    per_seq = jax.ops.segment_sum(kept_f.reshape(-1), seq_BL.reshape(-1), num_segments=B * (L + 1))
    num_seqs = jnp.maximum((per_seq > 0).sum(), 1)
    return kept_f / jnp.maximum(per_seq[seq_BL], 1.0) / num_seqs, kept_BL


def loss_sums(hidden_BLD: jax.Array, lm_head_DV: jax.Array, batch: Batch, weights_BL: jax.Array,
              cfg: LossConfig, router_loss: jax.Array | float = 0.0) -> dict[str, jax.Array]:
    """The loss of (a micro-batch of) the global batch and its metric sums, in chunks of
    `cfg.chunk_size` positions.

    Returns sums (not means) so callers can pool them (SUM_KEYS): `loss` (what is differentiated:
    the weighted cross-entropy plus router_coef * router_loss), `weighted`, `ce/mle`, `ce/rto`,
    `correct/rto` (argmax == target at RTO positions), `count/mle`, `count/rto`, `count/rto_kept`,
    `router_loss`. Pass a micro-batch's share of the router loss (router_loss / micro-batches).
    """
    chunk_size = cfg.chunk_size
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
    router = jnp.asarray(router_loss, jnp.float32)
    return {**sums, "loss": sums["weighted"] + cfg.router_coef * router,
            "count/mle": per_token["mle"].sum(), "count/rto": per_token["rto"].sum(),
            "count/rto_kept": kept_rto, "router_loss": router}


def metrics_from_sums(sums: Mapping[str, jax.Array], is_moe: bool = False) -> dict[str, jax.Array]:
    """Metrics from pooled sums: loss, loss/mle, loss/rto (over all RTO positions), rto/accuracy,
    tokens/*, and loss/router for MoE models."""
    metrics = {
        "loss": sums["loss"],
        "loss/mle": sums["ce/mle"] / jnp.maximum(sums["count/mle"], 1.0),
        "loss/rto": sums["ce/rto"] / jnp.maximum(sums["count/rto"], 1.0),
        "rto/accuracy": sums["correct/rto"] / jnp.maximum(sums["count/rto"], 1.0),
        "tokens/mle": sums["count/mle"],
        "tokens/rto": sums["count/rto"],
        "tokens/rto_kept": sums["count/rto_kept"],
    }
    if is_moe:
        metrics["loss/router"] = sums["router_loss"]
    return metrics


def derta_loss(hidden_BLD: jax.Array, lm_head_DV: jax.Array, batch: Batch, cfg: LossConfig,
               rng: jax.Array, router_loss: jax.Array | float = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DeRTa loss of one (global) batch: `(loss, aux)`.

    `loss` is the weighted mean cross-entropy over MLE tokens and kept RTO tokens (see module
    docstring) plus router_coef * router_loss; aux holds loss/mle and loss/rto (means over all
    MLE / RTO positions, kept or not), rto/accuracy and the token counts tokens/mle, tokens/rto,
    tokens/rto_kept.
    """
    weights_BL, _ = loss_weights(batch, cfg, rng)
    sums = loss_sums(hidden_BLD, lm_head_DV, batch, weights_BL, cfg, router_loss)
    return sums["loss"], metrics_from_sums(sums)
