"""The optimizer: optax AdamW with a warmup+cosine or constant schedule and global-norm clipping.

Weight decay skips norm scales and biases (a mask over the trainable tree). The optimizer only ever
sees the trainable tree: the full parameters, or with LoRA only the `lora` collection, so frozen
base weights have no optimizer state at all.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant")
NO_DECAY_LEAVES = ("scale", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-5
    schedule: str = "cosine"  # cosine | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 = off

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optimizer.warmup_ratio={self.warmup_ratio}: expected in [0, 1)")
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate={self.learning_rate}: expected > 0")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ceil(warmup_ratio * total_steps) (as transformers), then cosine to 0
    or constant."""
    if total_steps < 1:
        raise ValueError(f"train.steps={total_steps}: expected >= 1")
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    else:
        main = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps - warmup, 1))
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def decay_mask(tree: Any) -> Any:
    """True for leaves that get weight decay: everything except norm scales and biases."""
    def wants_decay(path, _):
        return jax.tree_util.keystr(path[-1:], simple=True) not in NO_DECAY_LEAVES
    return jax.tree_util.tree_map_with_path(wants_decay, tree)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                     optax.Schedule]:
    """The gradient transformation and its learning-rate schedule (for the `lr` metric)."""
    schedule = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
