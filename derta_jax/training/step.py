"""The train state, the pure train step (DeRTa or a `loss.objective` of training/preference.py),
and `build`: the one way to set both up.

    setup = build(StepConfig(model_cfg, LossConfig(), OptimizerConfig()), mesh, total_steps)
    state = setup.init(jax.random.PRNGKey(0), params)   # sharded; params=None: random init
    state, metrics = setup.train_step(state, batch, rng)

State is a plain dict (what Orbax saves as item "state"):
    step       int32 []        optimizer steps taken (a skipped non-finite step takes none)
    params     base weights    (float32 masters; frozen when LoRA is on)
    lora       LoRA adapters   ({} without LoRA)
    opt_state  optax state of the trainable tree only (params, or lora with LoRA)
    rng        uint32 [2]      the run's base key; step t uses fold_in(rng, t)

The step takes the global batch (sharded over (data, fsdp)), draws the RTO keep mask and the loss
weights on the whole of it, then accumulates `loss.loss_sums` and its gradients over
`accum_steps` micro-batches; because the weights are normalised over the global batch, the summed
micro-batch losses are exactly the pooled mean (see training/loss.py). The other objectives
take token log-probabilities from the same forward pass and pool their sums the same way (pairs
weigh 1 / pairs of the global batch); their reference is the frozen base of a LoRA run (a second
forward, adapters zeroed, no gradient) or the batch's precomputed `ref_logps`.

A step is finite when its loss and gradient norm are (values it computes anyway). The loop stops
on a non-finite step before anything of it is saved; with `skip_nonfinite` the step also keeps
the old trainable tree, optimizer state and step counter, so the run's skipped steps are its
loop steps minus `state["step"]`.
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
from derta_jax.models.decoder import Decoder, init_boxed, init_variables, lm_head_weight
from derta_jax.training import loss as loss_lib
from derta_jax.training import preference as pref
from derta_jax.training import sharding as shd
from derta_jax.training.loss import LossConfig
from derta_jax.training.optimizer import OptimizerConfig, make_optimizer

State = dict[str, Any]
Batch = Mapping[str, jax.Array]
BATCH_KEYS = ("tokens", "targets", "loss_mask", "rto_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    model: ModelConfig
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    accum_steps: int = 1  # micro-batches per optimizer step
    skip_nonfinite: bool = False  # a non-finite loss or norm/grad leaves the state as it was


def uses_lora(cfg: ModelConfig) -> bool:
    return cfg.lora_rank > 0


def _create_state(rng: jax.Array, params: Any | None, *, cfg: ModelConfig,
                  tx: optax.GradientTransformation) -> State:
    variables = init_variables(cfg, jax.random.fold_in(rng, 1))
    params = variables["params"] if params is None else params
    lora = variables.get("lora", {}) if uses_lora(cfg) else {}
    trainable = lora if uses_lora(cfg) else params
    return {"step": jnp.zeros((), jnp.int32), "params": params, "lora": lora,
            "opt_state": tx.init(trainable), "rng": rng}


def _state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation,
                     mesh: Mesh) -> tuple[State, State]:
    """(abstract state, NamedSharding per leaf) from jax.eval_shape of the init functions."""
    boxed = jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.PRNGKey(0))
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


def _micro_batches(tree: Any, k: int) -> Any:
    """[B, ...] -> [k, B/k, ...], micro-batch i taking rows i, i+k, ... (spread over devices)."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"global batch {x.shape[0]} is not divisible by "
                             f"train.accum_steps={k}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, tree)


def _micro_loss(trainable: Any, frozen: Any, mb: Batch, weights_BL: jax.Array, rng: jax.Array,
                inv_pairs: jax.Array, *, cfg: StepConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    mc, lc = cfg.model, cfg.loss
    params, lora = (frozen, trainable) if uses_lora(mc) else (trainable, None)
    variables = {"params": params, **({"lora": lora} if lora is not None else {})}
    hidden_BLD, aux = Decoder(mc).apply(
        variables, mb["tokens"], mb["positions"], mb["segment_ids"], return_hidden=True,
        deterministic=mc.lora_dropout == 0.0, rngs={"dropout": rng})
    lm_head = lm_head_weight(params, mc)
    if lc.objective == "derta":
        sums = loss_lib.loss_sums(hidden_BLD, lm_head, mb, weights_BL, lc,
                                  aux["router_loss"] / cfg.accum_steps)
        return sums["loss"], sums
    logp_BL = pref.token_logps(hidden_BLD, lm_head, mb["targets"], lc.chunk_size)
    ref_BL = None
    if lc.objective in pref.NEEDS_REFERENCE:
        ref_BL = _base_logps(params, lora, mb, mc, lc.chunk_size) if lora is not None \
            else mb["ref_logps"]
    if lc.objective == "constrained_sft":
        sums = pref.constrained_sums(logp_BL, ref_BL, mb, weights_BL, lc)
    else:
        sums = pref.pair_sums(logp_BL, ref_BL, mb, lc, inv_pairs)
    sums = {**{k: jnp.zeros((), jnp.float32) for k in sum_keys(lc.objective)}, **sums}
    router = aux["router_loss"] / cfg.accum_steps
    sums["loss"], sums["router_loss"] = sums["loss"] + lc.router_coef * router, router
    return sums["loss"], sums


def _base_logps(params: Any, lora: Any, mb: Batch, mc: ModelConfig, chunk: int) -> jax.Array:
    """The reference of a LoRA run: the frozen base (the adapters zeroed, so W + A @ 0 = W
    exactly), no gradient; token log-probabilities [B, L]."""
    zeros = jax.tree.map(jnp.zeros_like, lora)
    hidden_BLD, _ = Decoder(mc).apply({"params": params, "lora": zeros}, mb["tokens"],
                                      mb["positions"], mb["segment_ids"], return_hidden=True)
    return jax.lax.stop_gradient(
        pref.token_logps(hidden_BLD, lm_head_weight(params, mc), mb["targets"], chunk))


def sum_keys(objective: str) -> tuple[str, ...]:
    """The loss sums a step pools over its micro-batches."""
    return loss_lib.SUM_KEYS if objective == "derta" else ("loss", "router_loss", *pref.SUM_KEYS)


def batch_keys(cfg: StepConfig) -> tuple[str, ...]:
    """The batch arrays the step reads: the batch contract, plus `ref_logps` (float32, the
    precomputed reference, training/reference.py) for a full-parameter run that needs one."""
    return BATCH_KEYS + (("ref_logps",) if needs_stored_reference(cfg) else ())


def needs_stored_reference(cfg: StepConfig) -> bool:
    return cfg.loss.objective in pref.NEEDS_REFERENCE and not uses_lora(cfg.model)


def compute_grads(state: State, batch: Batch, rng: jax.Array, *, cfg: StepConfig
                  ) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the trainable tree on the global batch, and the pooled loss sums.

    The RTO keep mask, the loss weights and the pair weight (1 / pairs) are computed on the whole
    batch, then `accum_steps` micro-batches are scanned and their gradients and sums added.
    """
    keep_rng, dropout_rng = jax.random.split(rng)
    batch = {k: batch[k] for k in batch_keys(cfg)}
    if cfg.loss.objective in pref.PAIRS:  # pairs weigh 1 / pairs; tokens are not weighted
        weights_BL = jnp.zeros(batch["loss_mask"].shape, jnp.float32)
        inv_pairs = 1.0 / jnp.maximum(pref.pair_count(batch), 1.0)
    else:
        weights_BL, _ = loss_lib.loss_weights(batch, cfg.loss, keep_rng)
        inv_pairs = jnp.ones((), jnp.float32)
    lora_on = uses_lora(cfg.model)
    trainable, frozen = (state["lora"], state["params"]) if lora_on else (state["params"], None)
    k = cfg.accum_steps
    grad_fn = jax.grad(functools.partial(_micro_loss, cfg=cfg), has_aux=True)

    def accumulate(carry, xs):
        mb, w, i = xs
        grads, sums = grad_fn(trainable, frozen, mb, w, jax.random.fold_in(dropout_rng, i),
                              inv_pairs)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    init = (jax.tree.map(jnp.zeros_like, trainable),
            {name: jnp.zeros((), jnp.float32) for name in sum_keys(cfg.loss.objective)})
    (grads, sums), _ = jax.lax.scan(
        accumulate, init, (_micro_batches(batch, k), _micro_batches(weights_BL, k), jnp.arange(k)))
    return grads, sums


def train_step(state: State, batch: Batch, rng: jax.Array, *, cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule
               ) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step on the global batch. Pure; `build` jits it."""
    grads, sums = compute_grads(state, batch, rng, cfg=cfg)
    grad_norm = optax.global_norm(grads)
    key = "lora" if uses_lora(cfg.model) else "params"
    updates, opt_state = tx.update(grads, state["opt_state"], state[key])
    new = {key: optax.apply_updates(state[key], updates), "opt_state": opt_state,
           "step": state["step"] + 1}
    if cfg.skip_nonfinite:  # the select fuses into the update: no extra pass over the params
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        old = {k: state[k] for k in new}
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    objective = cfg.loss.objective
    metrics = {**(loss_lib.metrics_from_sums(sums, cfg.model.is_moe) if objective == "derta"
                  else pref.metrics_from_sums(sums, objective)),
               "norm/grad": grad_norm, "lr": schedule(state["step"])}
    return {**state, **new}, metrics


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `build` returns: everything a loop, a benchmark or a test needs to run steps."""

    cfg: StepConfig
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: State  # ShapeDtypeStructs of the state
    shardings: State  # NamedSharding per state leaf
    step_fn: Callable  # the jitted step (in/out shardings set, state donated)

    def init(self, rng: jax.Array, params: Any | None = None) -> State:
        """The train state created already sharded; `params` (e.g. a loaded model) replace the
        random initialisation of the base weights."""
        create = functools.partial(_create_state, cfg=self.cfg.model, tx=self.tx)
        with self.mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
            if params is None:
                return jax.jit(lambda r: create(r, None), out_shardings=self.shardings)(rng)
            params = jax.device_put(params, self.shardings["params"])
            return jax.jit(create, out_shardings=self.shardings, donate_argnums=1)(rng, params)

    def train_step(self, state: State, batch: Batch, rng: jax.Array
                   ) -> tuple[State, dict[str, jax.Array]]:
        with self.mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
            return self.step_fn(state, {k: batch[k] for k in batch_keys(self.cfg)}, rng)


def build(cfg: StepConfig, mesh: Mesh, total_steps: int) -> Setup:
    """The optimizer, the state's shardings and `train_step` jitted once with explicit shardings."""
    tx, schedule = make_optimizer(cfg.optimizer, total_steps)
    abstract, shardings = _state_shardings(cfg.model, tx, mesh)
    step = functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule)
    batch_sh = {k: shd.batch_sharding(mesh) for k in batch_keys(cfg)}
    step_fn = jax.jit(step, in_shardings=(shardings, batch_sh, shd.replicated(mesh)),
                      out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=0)
    return Setup(cfg, mesh, tx, schedule, abstract, shardings, step_fn)
