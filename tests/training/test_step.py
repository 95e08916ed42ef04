"""The sharded train step: mesh shapes, micro-batches, LoRA, and RTO vs the literal loop."""
import functools

import jax
import numpy as np
import pytest

from derta_jax.models.decoder import Decoder, init_variables, lm_head_weight
from derta_jax.training import loss as loss_lib
from derta_jax.training.loss import LossConfig
from derta_jax.training import optimizer as opt_lib
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib
from tests.training.helpers import REFUSAL, random_batch, tiny_model

OPT = opt_lib.OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0,
                              weight_decay=0.01)


def make(model_cfg, mesh_cfg, accum=1, rto_keep=1.0):
    mesh = shd.make_mesh(mesh_cfg)
    cfg = step_lib.StepConfig(model_cfg, LossConfig(rto_keep=rto_keep, chunk_size=8), OPT, accum)
    setup = step_lib.build(cfg, mesh, total_steps=10)
    return mesh, cfg, setup.init(jax.random.PRNGKey(0)), setup.train_step


def grads_on(mesh, cfg, state, batch, rng):
    fn = jax.jit(functools.partial(step_lib.compute_grads, cfg=cfg))
    with mesh:
        return jax.device_get(fn(state, shd.shard_batch(batch, mesh), rng))


def assert_trees_close(a, b, rtol=1e-5):
    """Close to float32 summation-order noise: rtol per element, plus rtol of the tensor's largest
    magnitude as the absolute floor (tiny entries of a large gradient carry its rounding)."""
    def close(x, y):
        y = np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.max(np.abs(y))) + 1e-7)
    jax.tree.map(close, a, b)


@pytest.fixture(scope="module")
def one_device():
    model = tiny_model()
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    cfg = step_lib.StepConfig(model, LossConfig(rto_keep=0.5, chunk_size=8), OPT)
    state = step_lib.build(cfg, mesh, total_steps=10).init(jax.random.PRNGKey(0))
    batch = random_batch(8, 16, seed=0)
    return model, cfg, jax.device_get(state), batch, grads_on(mesh, cfg, state, batch,
                                                               jax.random.PRNGKey(7))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_shapes_give_the_one_device_loss_and_grads(one_device, shape):
    model, cfg, host_state, batch, (g1, s1) = one_device
    mesh_cfg = shd.MeshConfig(*shape)
    mesh = shd.make_mesh(mesh_cfg)
    shardings = step_lib.build(cfg, mesh, total_steps=10).shardings
    state = jax.device_put(host_state, shardings)
    if shape[2] > 1:  # the tensor axis really splits the heads
        assert shardings["params"]["layers_0"]["attn"]["q_proj"]["kernel"].spec[1] == "tensor"
    g8, s8 = grads_on(mesh, cfg, state, batch, jax.random.PRNGKey(7))
    assert_trees_close(s1, s8)
    assert_trees_close(g1, g8)


@pytest.mark.parametrize("k", [2, 4])
def test_micro_batches_equal_one_big_batch(one_device, k):
    model, cfg, host_state, batch, (g1, s1) = one_device
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    gk, sk = grads_on(mesh, step_lib.StepConfig(model, cfg.loss, OPT, accum_steps=k), host_state,
                      batch, jax.random.PRNGKey(7))
    assert_trees_close(s1, sk)
    assert_trees_close(g1, gk)


def test_train_step_lowers_the_loss_and_reports_metrics():
    mesh, cfg, state, step = make(tiny_model(), shd.MeshConfig(data=2, fsdp=2, tensor=2))
    batch = shd.shard_batch(random_batch(8, 16, seed=1), mesh)
    losses = []
    for t in range(5):
        state, metrics = step(state, batch, jax.random.PRNGKey(t))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert int(state["step"]) == 5
    assert {"loss", "loss/mle", "loss/rto", "rto/accuracy", "tokens/mle", "tokens/rto",
            "norm/grad", "lr"} <= set(metrics)
    np.testing.assert_allclose(metrics["lr"], OPT.learning_rate)


def test_lora_with_zero_b_is_the_base_model_and_base_stays_frozen():
    base_cfg = tiny_model(num_layers=1)
    lora_cfg = tiny_model(num_layers=1, lora_rank=4, lora_alpha=8.0)
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4))
    cfg_base = step_lib.StepConfig(base_cfg, LossConfig(chunk_size=8), OPT)
    cfg_lora = step_lib.StepConfig(lora_cfg, LossConfig(chunk_size=8), OPT)
    base = step_lib.build(cfg_base, mesh, total_steps=10).init(jax.random.PRNGKey(0))
    base_params = jax.device_get(base["params"])
    lora_setup = step_lib.build(cfg_lora, mesh, total_steps=10)
    state = lora_setup.init(jax.random.PRNGKey(0), params=base_params)
    batch = random_batch(8, 16, seed=2)
    _, s_base = grads_on(mesh, cfg_base, base, batch, jax.random.PRNGKey(1))
    _, s_lora = grads_on(mesh, cfg_lora, state, batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(s_lora["weighted"], s_base["weighted"], rtol=1e-6)
    # Only the adapters have optimizer state: Adam's mu and nu, one of each per adapter.
    opt_arrays = [x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
    lora_arrays = [x.shape for x in jax.tree.leaves(state["lora"])]
    assert sorted(opt_arrays) == sorted(lora_arrays * 2)
    step = lora_setup.train_step
    lora0 = jax.device_get(state["lora"])
    for t in range(3):
        state, metrics = step(state, shd.shard_batch(batch, mesh), jax.random.PRNGKey(t))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), base_params)
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), jax.device_get(state["lora"]), lora0)
    assert all(jax.tree.leaves(changed))


def test_lora_adapters_and_their_adam_moments_shard_like_their_kernels():
    """lora_a [in, r] takes the kernel's input axis, lora_b [r, out] its output axis, and the
    rank takes fsdp where the other side does not, so no adapter is copied over fsdp (issue 14:
    replicated adapters cost 70B LoRA about 14 GiB per chip)."""
    from jax.sharding import PartitionSpec as P
    cfg = tiny_model(lora_rank=4, lora_alpha=8.0, scan_layers=False)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=4))
    state = step_lib.build(step_lib.StepConfig(cfg, LossConfig(chunk_size=8), OPT), mesh,
                           total_steps=10).init(jax.random.PRNGKey(0))
    layer = state["lora"]["layers_0"]
    want = {("attn", "q_proj"): (P("fsdp", None), P("fsdp", "tensor")),  # embed -> heads
            ("attn", "o_proj"): (P("tensor", "fsdp"), P(None, "fsdp")),  # heads -> embed
            ("mlp", "gate_proj"): (P("fsdp", None), P("fsdp", "tensor")),  # embed -> mlp
            ("mlp", "down_proj"): (P("tensor", "fsdp"), P(None, "fsdp"))}  # mlp -> embed
    for (block, name), (spec_a, spec_b) in want.items():
        adapter = layer[block][name]
        assert adapter["lora_a"].sharding.spec == spec_a, (name, adapter["lora_a"].sharding)
        assert adapter["lora_b"].sharding.spec == spec_b, (name, adapter["lora_b"].sharding)
    adapters = jax.tree.leaves(state["lora"])
    assert all("fsdp" in x.sharding.spec for x in adapters)
    # Adam's moments follow the adapters: nothing of the optimizer state is copied over fsdp.
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim == 2]
    assert len(moments) == 2 * len(adapters) and all("fsdp" in x.sharding.spec for x in moments)


def test_vectorised_rto_equals_the_literal_per_position_loop():
    """RTO loss on q + r̂ equals mean_t -log p(refusal | q, r̂<t), one forward per t."""
    cfg = tiny_model()
    params = jax.device_get(init_variables(cfg, jax.random.PRNGKey(3))["params"])
    rng = np.random.default_rng(4)
    q, r_hat = rng.integers(3, 64, 5), rng.integers(3, 64, 7)
    seq = np.concatenate([q, r_hat])
    n = len(seq)
    batch = {"tokens": seq[None].astype(np.int32),
             "targets": np.full((1, n), REFUSAL, np.int32),
             "loss_mask": (np.arange(n) >= len(q) - 1)[None] & (np.arange(n) < n - 1)[None],
             "segment_ids": np.ones((1, n), np.int32),
             "positions": np.arange(n, dtype=np.int32)[None]}
    batch["rto_mask"] = batch["loss_mask"].copy()
    model = Decoder(cfg)
    hidden, _ = model.apply({"params": params}, batch["tokens"], batch["positions"],
                            batch["segment_ids"], return_hidden=True)
    vectorised, aux = loss_lib.derta_loss(hidden, lm_head_weight(params, cfg), batch,
                                          LossConfig(chunk_size=4), jax.random.PRNGKey(0))
    forward = jax.jit(lambda ctx, seg: model.apply({"params": params}, ctx, batch["positions"],
                                                   seg)[0])
    literal = []
    for t in range(len(r_hat)):  # the context q + r̂<t (the rest is padding) predicts refusal
        end = len(q) + t
        ctx = np.where(np.arange(n) < end, seq, 0)[None].astype(np.int32)
        logits = forward(ctx, (np.arange(n) < end)[None].astype(np.int32))
        literal.append(-jax.nn.log_softmax(logits[0, end - 1])[REFUSAL])
    assert aux["tokens/rto"] == len(r_hat)
    np.testing.assert_allclose(vectorised, np.mean(literal), rtol=1e-5)


def test_skip_nonfinite_keeps_the_state_when_the_gradient_is_nan_and_the_loss_finite(
        one_device, monkeypatch):
    """The in-step check (issue 13): a NaN gradient norm with a finite loss leaves the trainable
    tree, the optimizer state and the step counter as they were; a finite step applies."""
    from tests.training.helpers import poison_grads
    model, cfg, host_state, batch, _ = one_device
    bad, good = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    poison_grads(monkeypatch, [bad])
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    setup = step_lib.build(step_lib.StepConfig(model, cfg.loss, OPT, skip_nonfinite=True), mesh, 10)
    sharded = shd.shard_batch(batch, mesh)
    state, metrics = setup.train_step(jax.device_put(host_state, setup.shardings), sharded, bad)
    assert np.isfinite(float(metrics["loss"])) and np.isnan(float(metrics["norm/grad"]))
    jax.tree.map(np.testing.assert_array_equal, host_state, jax.device_get(state))
    state, metrics = setup.train_step(state, sharded, good)
    assert int(state["step"]) == 1 and np.isfinite(float(metrics["norm/grad"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), host_state["params"],
                         jax.device_get(state["params"]))
    assert all(jax.tree.leaves(moved))
