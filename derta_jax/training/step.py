"""The train state and the pure, jitted DeRTa train step.

State is a plain dict (what Orbax saves as item "state"):
    step       int32 []        optimizer steps taken
    params     base weights    (float32 masters; frozen when LoRA is on)
    lora       LoRA adapters   ({} without LoRA)
    opt_state  optax state of the trainable tree only (params, or lora with LoRA)
    rng        uint32 [2]      the run's base key; step t uses fold_in(rng, t)

The step takes the global batch (sharded over (data, fsdp)), draws the RTO keep mask and the loss
weights on the whole of it, then accumulates gradients over `accum_steps` micro-batches; because
the weights are normalised over the global batch, the summed micro-batch losses are exactly the
pooled mean (see training/loss.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder, lm_head_weight
from derta_jax.training import loss as loss_lib
from derta_jax.training import sharding as shd

State = dict[str, Any]
Batch = Mapping[str, jax.Array]
BATCH_KEYS = ("tokens", "targets", "loss_mask", "rto_mask", "segment_ids", "positions")
SUM_KEYS = ("weighted", "ce/mle", "ce/rto", "correct/rto", "count/mle", "count/rto",
            "count/rto_kept", "router_loss")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    rto_keep: float = 1.0  # share of RTO positions that keep their loss each step
    normalisation: str = "token"  # token (official) | sequence
    chunk_size: int = 256  # sequence chunk for the LM head + cross-entropy
    router_coef: float = 0.0  # MoE load-balancing loss weight (0 = as transformers' default)

    def __post_init__(self):
        if not 0.0 < self.rto_keep <= 1.0:
            raise ValueError(f"loss.rto_keep={self.rto_keep}: expected in (0, 1]")
        if self.normalisation not in loss_lib.NORMALISATIONS:
            raise ValueError(f"loss.normalisation={self.normalisation!r}: expected one of "
                             f"{loss_lib.NORMALISATIONS}")
        if self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size={self.chunk_size}: expected >= 1")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    model: ModelConfig
    loss: LossConfig
    accum_steps: int = 1  # micro-batches per optimizer step


def uses_lora(cfg: ModelConfig) -> bool:
    return cfg.lora_rank > 0


def _init_variables(rng: jax.Array, cfg: ModelConfig) -> dict[str, Any]:
    """Boxed (logically annotated) variables of a fresh Decoder."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg).init({"params": rng}, tokens, tokens, tokens + 1)


def _create_state(rng: jax.Array, params: Any | None, *, cfg: ModelConfig,
                  tx: optax.GradientTransformation) -> State:
    variables = nn.meta.unbox(_init_variables(jax.random.fold_in(rng, 1), cfg))
    params = variables["params"] if params is None else params
    lora = variables.get("lora", {}) if uses_lora(cfg) else {}
    trainable = lora if uses_lora(cfg) else params
    return {"step": jnp.zeros((), jnp.int32), "params": params, "lora": lora,
            "opt_state": tx.init(trainable), "rng": rng}


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[State, State]:
    """(abstract state, NamedSharding per leaf) from jax.eval_shape of the init function."""
    boxed = jax.eval_shape(functools.partial(_init_variables, cfg=cfg),
                           jax.random.PRNGKey(0))
    var_shardings = shd.logical_shardings(boxed, mesh)
    abstract = jax.eval_shape(functools.partial(_create_state, params=None, cfg=cfg, tx=tx),
                              jax.random.PRNGKey(0))
    rep = shd.replicated(mesh)
    lora_sh = var_shardings.get("lora", {}) if uses_lora(cfg) else {}
    trainable_sh = lora_sh if uses_lora(cfg) else var_shardings["params"]
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], trainable_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    shardings = {"step": rep, "params": var_shardings["params"], "lora": lora_sh,
                 "opt_state": opt_sh, "rng": rep}
    return abstract, shardings


def init_state(rng: jax.Array, cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
               params: Any | None = None) -> State:
    """The train state created already sharded; `params` (e.g. a loaded model) replace the
    random initialisation."""
    _, shardings = state_shardings(cfg, tx, mesh)
    create = functools.partial(_create_state, cfg=cfg, tx=tx)
    with mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
        if params is None:
            return jax.jit(lambda r: create(r, None), out_shardings=shardings)(rng)
        params = jax.device_put(params, shardings["params"])
        return jax.jit(create, out_shardings=shardings, donate_argnums=1)(rng, params)


def _micro_batches(tree: Any, k: int) -> Any:
    """[B, ...] -> [k, B/k, ...], micro-batch i taking rows i, i+k, ... (spread over devices)."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"global batch {x.shape[0]} is not divisible by "
                             f"train.accum_steps={k}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, tree)


def _micro_loss(trainable: Any, frozen: Any, mb: Batch, weights_BL: jax.Array, rng: jax.Array, *,
                cfg: StepConfig, accum_steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    mc = cfg.model
    params, lora = (frozen, trainable) if uses_lora(mc) else (trainable, None)
    variables = {"params": params, **({"lora": lora} if lora is not None else {})}
    hidden_BLD, aux = Decoder(mc).apply(
        variables, mb["tokens"], mb["positions"], mb["segment_ids"], return_hidden=True,
        deterministic=mc.lora_dropout == 0.0, rngs={"dropout": rng})
    sums = loss_lib.chunked_ce_sums(hidden_BLD, lm_head_weight(params, mc), mb, weights_BL,
                                    chunk_size=cfg.loss.chunk_size)
    router = jnp.asarray(aux["router_loss"], jnp.float32) / accum_steps
    return sums["weighted"] + cfg.loss.router_coef * router, {**sums, "router_loss": router}


def compute_grads(state: State, batch: Batch, rng: jax.Array, *, cfg: StepConfig
                  ) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the trainable tree on the global batch, and the pooled loss sums.

    The RTO keep mask and loss weights are drawn on the whole batch, then `accum_steps`
    micro-batches are scanned and their gradients and sums added.
    """
    keep_rng, dropout_rng = jax.random.split(rng)
    batch = {k: batch[k] for k in BATCH_KEYS}
    weights_BL, _ = loss_lib.loss_weights(batch, rto_keep=cfg.loss.rto_keep, rng=keep_rng,
                                          normalisation=cfg.loss.normalisation)
    lora_on = uses_lora(cfg.model)
    trainable, frozen = (state["lora"], state["params"]) if lora_on else (state["params"], None)
    k = cfg.accum_steps
    grad_fn = jax.grad(functools.partial(_micro_loss, cfg=cfg, accum_steps=k), has_aux=True)

    def accumulate(carry, xs):
        mb, w, i = xs
        grads, sums = grad_fn(trainable, frozen, mb, w, jax.random.fold_in(dropout_rng, i))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    init = (jax.tree.map(jnp.zeros_like, trainable),
            {name: jnp.zeros((), jnp.float32) for name in SUM_KEYS})
    (grads, sums), _ = jax.lax.scan(
        accumulate, init, (_micro_batches(batch, k), _micro_batches(weights_BL, k), jnp.arange(k)))
    return grads, sums


def train_step(state: State, batch: Batch, rng: jax.Array, *, cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule
               ) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step on the global batch. Pure; jit it with `make_train_step`."""
    grads, sums = compute_grads(state, batch, rng, cfg=cfg)
    lora_on = uses_lora(cfg.model)
    trainable = state["lora"] if lora_on else state["params"]
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = {**state, "step": state["step"] + 1, "opt_state": opt_state,
                 ("lora" if lora_on else "params"): trainable}
    metrics = {"loss": sums["weighted"] + cfg.loss.router_coef * sums["router_loss"],
               **loss_lib.metrics_from_sums(sums),
               "norm/grad": optax.global_norm(grads), "lr": schedule(state["step"])}
    if cfg.model.is_moe:
        metrics["loss/router"] = sums["router_loss"]
    return new_state, metrics


def make_train_step(cfg: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, state_sharding: State
                    ) -> Callable[[State, Batch, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """`train_step` jitted once with explicit shardings; the state is donated."""
    step = functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule)
    batch_sh = {k: shd.batch_sharding(mesh) for k in BATCH_KEYS}
    jitted = jax.jit(step, in_shardings=(state_sharding, batch_sh, shd.replicated(mesh)),
                     out_shardings=(state_sharding, shd.replicated(mesh)), donate_argnums=0)

    def run(state: State, batch: Batch, rng: jax.Array) -> tuple[State, dict[str, jax.Array]]:
        with mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
            return jitted(state, {k: batch[k] for k in BATCH_KEYS}, rng)

    return run
