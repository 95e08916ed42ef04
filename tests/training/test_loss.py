"""The DeRTa loss against literal numpy formulas (no model needed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.training import loss as loss_lib
from derta_jax.training.loss import LossConfig

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
    loss, aux = loss_lib.derta_loss(hidden, w, batch, LossConfig(chunk_size=chunk),
                                    jax.random.PRNGKey(0))
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
    loss, _ = loss_lib.derta_loss(hidden, w, batch,
                                  LossConfig(chunk_size=4, normalisation="sequence"),
                                  jax.random.PRNGKey(0))
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
        return loss_lib.derta_loss(hidden, w, batch, LossConfig(chunk_size=3),
                                   jax.random.PRNGKey(0))[0]

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


@pytest.mark.parametrize("rule", loss_lib.KEEP_RULES)
def test_dropped_rto_positions_carry_no_loss(inputs, rule):
    hidden, w, batch = inputs
    rng = jax.random.PRNGKey(5)
    cfg = LossConfig(rto_keep=0.3, rto_keep_rule=rule, chunk_size=4)
    loss, aux = loss_lib.derta_loss(hidden, w, batch, cfg, rng)
    _, kept = loss_lib.loss_weights(batch, cfg, rng)
    kept = np.asarray(kept)
    ce, _ = numpy_ce(hidden, w, batch["targets"])
    np.testing.assert_allclose(loss, ce[kept].mean(), rtol=1e-5)
    assert aux["tokens/rto_kept"] == (kept & batch["rto_mask"]).sum() < batch["rto_mask"].sum()


def test_unknown_normalisation_names_the_key():
    with pytest.raises(ValueError, match="normalisation='mean'"):
        LossConfig(normalisation="mean")
    with pytest.raises(ValueError, match="rto_keep_rule='some'"):
        LossConfig(rto_keep_rule="some")


@pytest.mark.parametrize("length,keep,count", [(1024, 0.05, 52), (100, 0.05, 5), (20, 0.05, 1),
                                               (10, 0.05, 1), (41, 0.05, 3), (64, 1.0, 64)])
def test_official_keep_count_is_max_1_ceil_n_over_20(length, keep, count):
    assert loss_lib.official_keep_count(length, keep) == count


def test_official_rule_on_a_10_token_response_in_a_1024_token_row():
    """max(1, ceil(1024/20)) = 52 distinct positions of the row; the response's 10 positions keep
    52 * 10 / 1024 = 0.508 on average and none with probability C(1014, 52) / C(1024, 52)."""
    rows, length = 4000, 1024
    rto = np.zeros((rows, length), bool)
    rto[:, 600:610] = True
    kept = np.asarray(loss_lib.rto_keep_official(jnp.asarray(rto), jax.random.PRNGKey(0), 0.05))
    assert not (kept & ~rto).any()
    per_row = kept.sum(axis=1)
    p_none = np.prod([(1024 - 52 - i) / (1024 - i) for i in range(10)])  # 0.592
    np.testing.assert_allclose(per_row.mean(), 52 * 10 / 1024, atol=0.04)
    np.testing.assert_allclose((per_row == 0).mean(), p_none, atol=0.03)
    drawn = np.asarray(loss_lib.rto_keep_official(jnp.ones((8, length), bool),
                                                  jax.random.PRNGKey(1), 0.05))
    assert (drawn.sum(axis=1) == 52).all()  # exactly ceil(n / 20) distinct positions per row
    assert not (np.asarray(loss_lib.rto_keep_official(jnp.asarray(rto), jax.random.PRNGKey(2),
                                                       0.05)) == kept).all()  # redrawn per rng
