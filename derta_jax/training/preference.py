"""Objectives besides DeRTa on the same step: DPO, IPO, SimPO and token-wise constrained SFT.

`loss.objective` picks one (training/loss.py LossConfig; `derta` is loss.py itself):

- dpo (Rafailov et al. 2023; TRL DPOTrainer `loss_type="sigmoid"`): with log-ratios
  ρ_c = log π(c|x) - log π_ref(c|x), ρ_r likewise and z = β (ρ_c - ρ_r),
  loss = -(1 - ε) log σ(z) - ε log σ(-z), per pair. With label smoothing ε > 0 this is the
  conservative form (cDPO, Mitchell 2023), as TRL's CPOTrainer `sigmoid` and earlier TRL
  DPOTrainers compute it; TRL 1.16's DPOTrainer `sigmoid` ignores `label_smoothing`, and its
  `robust` is another (unbiased) form.
- ipo (Azar et al. 2023; TRL `loss_type="ipo"`): ((ρ_c / |c| - ρ_r / |r|) - 1 / (2β))², the
  log-ratios averaged over each response's tokens as TRL does (confirmed there with the authors).
- simpo (Meng et al. 2024; TRL's CPO trainer, `loss_type="simpo"`, cpo_alpha=0): no reference;
  z = β (log π(c|x) / |c| - log π(r|x) / |r|) - γ, loss = -(1 - ε) log σ(z) - ε log σ(-z).
- constrained_sft (Qi et al. 2025, "Safety Alignment Should Be Made More Than Just a Few Tokens
  Deep", Eq. 3): per supervised token t (counted from 1 in each response: each assistant turn),
  -(2 / β_t) log σ(β_t (log π(y_t | ..) - log π_ref(y_t | ..))), with their released code's
  schedule: β_1 = β * first_token_factor, β_t = β * bias_factor for 2 <= t <= bias_length, β
  after (defaults 0.1, 5, 20, 5: β_1 = 0.5, β_2..5 = 2, then 0.1), averaged like the DeRTa loss
  (`loss.normalisation`). Their code multiplies the token log-probability by the detached weight
  2 (1 - σ(β_t Δ_t)), floored at 1e-3: the same gradient without the floor; we use the formula.

Preference batches hold pairs: the chosen and the rejected sequence of one prompt are neighbouring
segments of one row (segment 2j + 1 chosen, 2j + 2 rejected; data/packing.py), so packing serves
pairs too and a pair never straddles two rows or micro-batches. Sequence log-probabilities are
sums over each segment's supervised positions (`loss_mask`; prompt tokens never carry loss). The
mean over pairs is taken over the global batch: every pair weighs 1 / (pairs in the global batch),
so summed micro-batches give exactly the pooled mean, as in loss.py.

The reference log-probabilities are per token: with LoRA the frozen base (a forward with the
adapters zeroed), otherwise `batch["ref_logps"]`, precomputed once per run (training/reference.py).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

OBJECTIVES = ("derta", "dpo", "ipo", "simpo", "constrained_sft")
PAIRS = ("dpo", "ipo", "simpo")  # objectives on {prompt, chosen, rejected} pairs
NEEDS_REFERENCE = ("dpo", "ipo", "constrained_sft")
SUM_KEYS = ("pref/loss", "reward/chosen", "reward/rejected", "reward/correct", "count/pairs",
            "logps/chosen", "logps/rejected", "ce/mle", "count/mle")
Batch = Mapping[str, jax.Array]


def token_logps(hidden_BLD: jax.Array, lm_head_DV: jax.Array, targets_BL: jax.Array,
                chunk_size: int) -> jax.Array:
    """log p(targets[t] | ..) at every position, float32 [B, L]; the LM head and log-softmax run
    in sequence chunks under `jax.checkpoint`, so float32 logits exist for one chunk at a time."""
    B, L, D = hidden_BLD.shape
    c = min(chunk_size, L)
    pad = -L % c
    n = (L + pad) // c
    h = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
    t = jnp.pad(targets_BL.astype(jnp.int32), ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)
    w_DV = lm_head_DV.astype(hidden_BLD.dtype)

    @jax.checkpoint
    def chunk(xs):
        h_BcD, t_Bc = xs
        logits = jnp.einsum("bcd,dv->bcv", h_BcD, w_DV, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    return jax.lax.map(chunk, (h, t)).swapaxes(0, 1).reshape(B, n * c)[:, :L]


def _per_segment(values_BL: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
    """[B, L + 1]: the sum of `values` over each (row, segment id)."""
    B, L = segment_ids_BL.shape
    seg = jnp.clip(segment_ids_BL, 0, L)
    index = jnp.arange(B, dtype=jnp.int32)[:, None] * (L + 1) + seg
    return jax.ops.segment_sum(values_BL.reshape(-1), index.reshape(-1),
                               num_segments=B * (L + 1)).reshape(B, L + 1)


def _pairs(per_seg_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) [B, P] from per-segment values: segments 2j + 1 and 2j + 2 of a row."""
    chosen, rejected = per_seg_BS[:, 1::2], per_seg_BS[:, 2::2]
    p = min(chosen.shape[1], rejected.shape[1])
    return chosen[:, :p], rejected[:, :p]


def pair_count(batch: Batch) -> jax.Array:
    """Pairs of the batch whose chosen and rejected sequences both carry loss (call on the
    global batch: its inverse is each pair's weight)."""
    counts = _per_segment(batch["loss_mask"].astype(jnp.float32), batch["segment_ids"])
    n_c, n_r = _pairs(counts)
    return ((n_c > 0) & (n_r > 0)).sum().astype(jnp.float32)


def _logsigmoid_smoothed(z: jax.Array, eps: float) -> jax.Array:
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def pair_sums(logp_BL: jax.Array, ref_BL: jax.Array | None, batch: Batch, cfg,
              inv_pairs: jax.Array) -> dict[str, jax.Array]:
    """The preference loss of (a micro-batch of) the global batch as sums: `loss` (each pair's
    loss times `inv_pairs`, what is differentiated) and SUM_KEYS. `cfg`: loss.LossConfig."""
    mask = batch["loss_mask"].astype(jnp.float32)
    seg = batch["segment_ids"]
    lp_c, lp_r = _pairs(_per_segment(logp_BL * mask, seg))
    n_c, n_r = _pairs(_per_segment(mask, seg))
    valid = ((n_c > 0) & (n_r > 0)).astype(jnp.float32)
    len_c, len_r = jnp.maximum(n_c, 1.0), jnp.maximum(n_r, 1.0)
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.objective == "simpo":
        reward_c, reward_r = beta * lp_c / len_c, beta * lp_r / len_r
        losses = _logsigmoid_smoothed(reward_c - reward_r - cfg.simpo_gamma, eps)
    else:
        ref_c, ref_r = _pairs(_per_segment(ref_BL * mask, seg))
        rho_c, rho_r = lp_c - ref_c, lp_r - ref_r
        reward_c, reward_r = beta * rho_c, beta * rho_r
        if cfg.objective == "dpo":
            losses = _logsigmoid_smoothed(beta * (rho_c - rho_r), eps)
        else:  # ipo
            losses = (rho_c / len_c - rho_r / len_r - 1.0 / (2.0 * beta)) ** 2
    losses = losses * valid
    return {"loss": (losses * inv_pairs).sum(), "pref/loss": losses.sum(),
            "reward/chosen": (reward_c * valid).sum(), "reward/rejected": (reward_r * valid).sum(),
            "reward/correct": ((reward_c > reward_r) * valid).sum(), "count/pairs": valid.sum(),
            "logps/chosen": (lp_c * valid).sum(), "logps/rejected": (lp_r * valid).sum(),
            "ce/mle": -(logp_BL * mask).sum(), "count/mle": mask.sum()}


def token_index(loss_mask_BL: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
    """[B, L] int32: t of each supervised position, counted from 1 in its response (a run of
    supervised positions inside one segment: each assistant turn of a multi-turn row restarts),
    0 where nothing is supervised."""
    m = loss_mask_BL.astype(bool)
    seg = segment_ids_BL
    prev_m = jnp.pad(m[:, :-1], ((0, 0), (1, 0)))
    prev_seg = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    idx = jnp.broadcast_to(jnp.arange(m.shape[1], dtype=jnp.int32), m.shape)
    starts = jnp.where(m & (~prev_m | (seg != prev_seg)), idx, 0)
    run_start = jax.lax.cummax(starts, axis=1)
    return jnp.where(m, idx - run_start + 1, 0).astype(jnp.int32)


def constrained_betas(t_BL: jax.Array, cfg) -> jax.Array:
    """β_t of Qi et al.'s schedule (see the module docstring) at token index t >= 1."""
    b = cfg.beta
    betas = jnp.where(t_BL <= cfg.csft_bias_length, b * cfg.csft_bias_factor, b)
    return jnp.where(t_BL == 1, b * cfg.csft_first_token_factor, betas).astype(jnp.float32)


def constrained_sums(logp_BL: jax.Array, ref_BL: jax.Array, batch: Batch, weights_BL: jax.Array,
                     cfg) -> dict[str, jax.Array]:
    """Qi et al.'s token-wise constrained loss as sums: `loss` (the per-token losses weighted by
    `weights_BL`, loss.loss_weights), `pref/loss` (their plain sum) and the MLE cross-entropy."""
    mask = batch["loss_mask"].astype(jnp.float32)
    betas = constrained_betas(token_index(batch["loss_mask"], batch["segment_ids"]), cfg)
    per_token = -(2.0 / betas) * jax.nn.log_sigmoid(betas * (logp_BL - ref_BL)) * mask
    return {"loss": (per_token * weights_BL).sum(), "pref/loss": per_token.sum(),
            "ce/mle": -(logp_BL * mask).sum(), "count/mle": mask.sum()}


def metrics_from_sums(sums: Mapping[str, jax.Array], objective: str) -> dict[str, jax.Array]:
    """Metrics from pooled sums: loss, loss/<objective>, loss/mle (the mean NLL of the supervised
    tokens), tokens/mle and, for pairs, reward/{chosen, rejected, accuracy, margin} and
    logps/{chosen, rejected} (means over pairs)."""
    tokens = jnp.maximum(sums["count/mle"], 1.0)
    out = {"loss": sums["loss"], "loss/mle": sums["ce/mle"] / tokens, "tokens/mle": sums["count/mle"]}
    if objective == "constrained_sft":
        return {**out, f"loss/{objective}": sums["pref/loss"] / tokens}
    pairs = jnp.maximum(sums["count/pairs"], 1.0)
    chosen, rejected = sums["reward/chosen"] / pairs, sums["reward/rejected"] / pairs
    return {**out, f"loss/{objective}": sums["pref/loss"] / pairs, "reward/chosen": chosen,
            "reward/rejected": rejected, "reward/accuracy": sums["reward/correct"] / pairs,
            "reward/margin": chosen - rejected, "logps/chosen": sums["logps/chosen"] / pairs,
            "logps/rejected": sums["logps/rejected"] / pairs, "pairs": sums["count/pairs"]}
