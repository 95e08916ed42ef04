"""The DeRTa loss against literal numpy formulas (no model needed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.training import loss as loss_lib

B, L, D, V, REFUSAL = 3, 10, 8, 13, 7


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Row 0: one MLE example; row 1: two packed examples (MLE, RTO); row 2: RTO + padding."""
    rng = np.random.default_rng(seed)
    seg = np.array([[1] * 10, [1] * 4 + [2] * 6, [1] * 7 + [0] * 3], np.int32)
    pos = np.concatenate([np.arange(10)[None], [list(range(4)) + list(range(6))],
                          [list(range(7)) + [0] * 3]]).astype(np.int32)
    loss_mask = np.array([[0] * 3 + [1] * 7, [0, 1, 1, 1, 0, 0, 1, 1, 1, 1],
                          [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]], bool)
    rto = np.zeros((B, L), bool)
    rto[1, 6:] = True
    rto[2, 2:7] = True
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    targets[rto] = REFUSAL
    tokens = rng.integers(0, V, (B, L)).astype(np.int32)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, rto_mask=rto,
                segment_ids=seg, positions=pos)


def numpy_ce(hidden, w, targets):
    logits = np.einsum("bld,dv->blv", hidden.astype(np.float64), w.astype(np.float64))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0], logits.argmax(-1)


@pytest.fixture
def inputs():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(B, L, D)).astype(np.float32),
            rng.normal(size=(D, V)).astype(np.float32), make_batch())


@pytest.mark.parametrize("chunk", [3, 4, 10, 64])
def test_token_mean_matches_numpy(inputs, chunk):
    hidden, w, batch = inputs
    loss, aux = loss_lib.derta_loss(hidden, w, batch, rto_keep=1.0, rng=jax.random.PRNGKey(0),
                                    chunk_size=chunk)
    ce, argmax = numpy_ce(hidden, w, batch["targets"])
    mle = batch["loss_mask"] & ~batch["rto_mask"]
    rto = batch["rto_mask"]
    np.testing.assert_allclose(loss, ce[batch["loss_mask"]].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["loss/mle"], ce[mle].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["loss/rto"], ce[rto].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["rto/accuracy"], (argmax[rto] == REFUSAL).mean())
    assert aux["tokens/mle"] == mle.sum() and aux["tokens/rto"] == rto.sum() == 9


def test_sequence_mean_matches_numpy(inputs):
    hidden, w, batch = inputs
    loss, _ = loss_lib.derta_loss(hidden, w, batch, rto_keep=1.0, rng=jax.random.PRNGKey(0),
                                  chunk_size=4, normalisation="sequence")
    ce, _ = numpy_ce(hidden, w, batch["targets"])
    means = []
    for b in range(B):
        for s in (1, 2):
            sel = batch["loss_mask"][b] & (batch["segment_ids"][b] == s)
            if sel.any():
                means.append(ce[b][sel].mean())
    assert len(means) == 4
    np.testing.assert_allclose(loss, np.mean(means), rtol=1e-5)


def test_chunked_gradients_match_full_logits(inputs):
    hidden, w, batch = inputs

    def full(hidden, w):  # the textbook formula: all logits at once
        logp = jax.nn.log_softmax(hidden @ w, axis=-1)
        ce = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        m = batch["loss_mask"]
        return (ce * m).sum() / m.sum()

    def chunked(hidden, w):
        return loss_lib.derta_loss(hidden, w, batch, rto_keep=1.0, rng=jax.random.PRNGKey(0),
                                   chunk_size=3)[0]

    g_full = jax.grad(full, argnums=(0, 1))(hidden, w)
    g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, w)
    for a, b in zip(g_full, g_chunk):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rto_keep_mask_keeps_one_per_sequence_and_about_the_ratio():
    Bk, Lk = 64, 40
    seg = np.repeat(np.array([1] * 20 + [2] * 15 + [0] * 5)[None], Bk, 0).astype(np.int32)
    rto = np.zeros((Bk, Lk), bool)
    rto[:, 5:20] = True  # segment 1: 15 RTO positions
    rto[::2, 30:35] = True  # segment 2 of even rows: 5 RTO positions
    keep = np.asarray(loss_lib.rto_keep_mask(jnp.asarray(rto), jnp.asarray(seg),
                                             jax.random.PRNGKey(3), 0.05))
    assert not (keep & ~rto).any()
    assert keep[:, 5:20].any(axis=1).all()
    assert keep[::2, 30:35].any(axis=1).all()
    assert 0.04 < keep.sum() / rto.sum() < 0.2  # 5% plus the one forced per sequence
    again = loss_lib.rto_keep_mask(jnp.asarray(rto), jnp.asarray(seg), jax.random.PRNGKey(3), 0.05)
    np.testing.assert_array_equal(keep, again)
    np.testing.assert_array_equal(loss_lib.rto_keep_mask(rto, seg, jax.random.PRNGKey(3), 1.0), rto)


def test_dropped_rto_positions_carry_no_loss(inputs):
    hidden, w, batch = inputs
    rng = jax.random.PRNGKey(5)
    loss, aux = loss_lib.derta_loss(hidden, w, batch, rto_keep=0.3, rng=rng, chunk_size=4)
    _, kept = loss_lib.loss_weights(batch, rto_keep=0.3, rng=rng)
    kept = np.asarray(kept)
    ce, _ = numpy_ce(hidden, w, batch["targets"])
    np.testing.assert_allclose(loss, ce[kept].mean(), rtol=1e-5)
    assert aux["tokens/rto_kept"] == (kept & batch["rto_mask"]).sum() < batch["rto_mask"].sum()


def test_unknown_normalisation_names_the_key(inputs):
    hidden, w, batch = inputs
    with pytest.raises(ValueError, match="loss.normalisation='mean'"):
        loss_lib.derta_loss(hidden, w, batch, rto_keep=1.0, rng=jax.random.PRNGKey(0),
                            normalisation="mean")
