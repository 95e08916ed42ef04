"""The optimizer's schedules and weight decay against the formulas they implement."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from derta_jax.training import optimizer as opt_lib


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1])
def test_linear_schedule_is_the_trainer_default(warmup_ratio):
    """transformers' get_linear_schedule_with_warmup: lr * (T - t) / (T - W) after W warmup steps."""
    T, lr = 100, 1e-4
    sched = opt_lib.make_schedule(opt_lib.OptimizerConfig(learning_rate=lr, schedule="linear",
                                                          warmup_ratio=warmup_ratio), T)
    W = int(np.ceil(warmup_ratio * T))
    for t in (W, 50, 75, T - 1, T):
        np.testing.assert_allclose(sched(t), lr * (T - t) / (T - W), rtol=1e-5, atol=1e-12)
    if not W:
        np.testing.assert_allclose(sched(T // 2), lr / 2, rtol=1e-6)  # half-way: half the peak


def _one_step(decay_norms: bool):
    """One AdamW step with zero gradients: only the decoupled decay moves the weights."""
    cfg = opt_lib.OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_ratio=0.0,
                                  weight_decay=0.5, decay_norms=decay_norms, grad_clip=0.0)
    tx, _ = opt_lib.make_optimizer(cfg, 10)
    params = {"input_norm": {"scale": jnp.full((3,), 2.0)}, "q_proj": {"kernel": jnp.full((3,), 2.0)}}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_weight_decay_reaches_norm_scales_by_default_as_the_official_adamw():
    new = _one_step(decay_norms=True)
    want = 2.0 - 0.1 * 0.5 * 2.0  # w - lr * wd * w
    np.testing.assert_allclose(new["input_norm"]["scale"], want, rtol=1e-6)
    np.testing.assert_allclose(new["q_proj"]["kernel"], want, rtol=1e-6)


def test_norm_scales_can_be_excluded_from_decay():
    new = _one_step(decay_norms=False)
    np.testing.assert_array_equal(new["input_norm"]["scale"], 2.0)
    np.testing.assert_allclose(new["q_proj"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
