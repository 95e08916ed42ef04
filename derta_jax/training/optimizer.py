"""The optimizer: optax AdamW with a warmup + cosine, linear or constant schedule and global-norm
clipping.

Weight decay applies to every trainable tensor, as the official DeepSpeed AdamW does
(`decay_norms=True`); `decay_norms=False` skips norm scales and biases. The optimizer only ever
sees the trainable tree: the full parameters, or with LoRA only the `lora` collection, so frozen
base weights have no optimizer state at all.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
NO_DECAY_LEAVES = ("scale", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-5  # peak learning rate
    schedule: str = "cosine"  # after warmup: cosine to 0 | linear to 0 (HF Trainer default) | constant
    warmup_ratio: float = 0.03  # share of steps with linear warmup (ceil, as transformers)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    decay_norms: bool = True  # decay norm scales and biases too (official); False skips them
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 1.0  # global-norm gradient clipping; 0 = off

    def __post_init__(self):
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0")


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: expected {expected}")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ceil(warmup_ratio * total_steps) (as transformers), then cosine or linear
    decay to 0 at `total_steps`, or constant."""
    if total_steps < 1:
        raise ValueError(f"train.steps={total_steps}: expected >= 1")
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    else:
        main = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def decay_mask(tree: Any) -> Any:
    """True for leaves that get weight decay when norms are excluded: all but norm scales and biases."""
    def wants_decay(path, _):
        return jax.tree_util.keystr(path[-1:], simple=True) not in NO_DECAY_LEAVES
    return jax.tree_util.tree_map_with_path(wants_decay, tree)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                     optax.Schedule]:
    """The gradient transformation and its learning-rate schedule (for the `lr` metric)."""
    schedule = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=None if cfg.decay_norms else decay_mask))
    return optax.chain(*parts), schedule
