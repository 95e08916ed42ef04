"""Packing isolation and positions, examples per step, loader determinism, resume (also through Orbax)."""
import numpy as np
import pytest

from derta_jax.data import loader, packing
from derta_jax.data.tokenize import TokenizedExample

SEQ = 32


def _examples(n=40, seed=0):
    """Example i has tokens 1000*i + 1, ... so every token names its example."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(4, 20))
        out.append(TokenizedExample(np.arange(1000 * i + 1, 1000 * i + 1 + length, dtype=np.int32),
                                    prompt_len=2, refusal_id=7 if i % 4 == 0 else -1))
    return out


def _owner(token):
    return (token - 1) // 1000


def _seen(batches):
    return [_owner(b["tokens"][r, s == k][0]) for b in batches for r, s in enumerate(b["segment_ids"])
            for k in np.unique(s) if k]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _loader(examples, batch, seed, **kwargs):
    plan = loader.make_plan(examples, batch, kwargs.pop("seq_len", SEQ), seed, **kwargs)
    return plan, loader.make_loader(examples, plan, seed)


def test_packed_rows_keep_examples_apart():
    examples = _examples()
    plan, it = _loader(examples, 8, seed=1)
    for b in _take(it, 3):
        assert all(b[k].shape == (plan.rows_per_step, SEQ) for k in packing.BATCH_KEYS)
        for r in range(plan.rows_per_step):
            seg, pos, tok, tgt = b["segment_ids"][r], b["positions"][r], b["tokens"][r], b["targets"][r]
            for k in np.unique(seg[seg > 0]):
                idx = np.flatnonzero(seg == k)
                ex = examples[_owner(tok[idx[0]])]
                assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(len(idx))).all()
                assert (tok[idx] == ex.tokens).all()  # the whole example, in order
                sup = b["loss_mask"][r, idx]
                assert not sup[-1] and sup.sum() == len(idx) - ex.prompt_len  # no target crosses segments
                want = np.full(sup.sum(), 7) if ex.is_rto else ex.tokens[ex.prompt_len:]
                assert (tgt[idx][sup] == want).all() and (b["rto_mask"][r, idx] == (sup & ex.is_rto)).all()
            # the architecture's attention rule, written literally: nothing crosses a segment
            allowed = (seg[None, :] == seg[:, None]) & (seg[:, None] != 0) & (pos[None, :] <= pos[:, None])
            i, j = np.nonzero(allowed)
            assert (_owner(tok[i]) == _owner(tok[j])).all() and (j <= i).all()
            assert (b["tokens"][r, seg == 0] == 0).all() and not b["loss_mask"][r, seg == 0].any()


def test_unpacked_batches_pad_to_buckets():
    b = next(_loader(_examples(), 4, seed=0, packing=False, bucket_lengths=(20, SEQ))[1])
    assert b["tokens"].shape == (4, 20) and set(np.unique(b["segment_ids"])) <= {0, 1}
    assert 0 < packing.non_pad_share(b) < 1
    with pytest.raises(ValueError, match="fits no bucket"):
        packing.pad_batch([{"tokens": np.zeros(9)}], [8])


def test_same_seed_same_batches_other_seed_other_order():
    a = _take(_loader(_examples(), 4, seed=3, epochs=2)[1], 4)
    b = _take(_loader(_examples(), 4, seed=3, epochs=2)[1], 4)
    c = _take(_loader(_examples(), 4, seed=4, epochs=2)[1], 4)
    assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, b))
    assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, c))


def test_resume_mid_epoch_equals_uninterrupted_run():
    _, it = _loader(_examples(), 4, seed=5, epochs=2)
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 12)  # crosses the epoch boundary (10 steps per epoch)
    _, resumed = _loader(_examples(), 4, seed=5, epochs=2)
    resumed.set_state(state)
    got = _take(resumed, 12)
    for w, g in zip(want, got):
        assert all((w[k] == g[k]).all() for k in packing.BATCH_KEYS)


def test_resume_through_orbax_with_the_grain_handler(tmp_path):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    _, it = _loader(_examples(), 4, seed=6)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = _take(it, 3)
        _, fresh = _loader(_examples(), 4, seed=6)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert all((w["tokens"] == g["tokens"]).all() for w, g in zip(want, _take(fresh, 3)))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch", [1, 4, 7])
def test_every_step_takes_batch_examples_and_every_example_is_seen_once_per_epoch(packed, batch):
    """41 examples, `batch` per step: ceil(41 / batch) steps per epoch, the last takes the rest."""
    examples = _examples(n=41)
    plan, it = _loader(examples, batch, seed=2, epochs=2, packing=packed)
    per_epoch = -(-41 // batch)
    assert (plan.steps_per_epoch, plan.total_steps) == (per_epoch, 2 * per_epoch)
    batches = list(it)
    assert len(batches) == 2 * per_epoch
    assert {b["tokens"].shape[0] for b in batches} == {plan.rows_per_step}  # static shapes
    counts = [len(_seen([b])) for b in batches]
    assert counts == ([batch] * (per_epoch - 1) + [41 - batch * (per_epoch - 1)]) * 2
    for epoch in range(2):
        assert sorted(_seen(batches[epoch * per_epoch:(epoch + 1) * per_epoch])) == list(range(41))


def test_rows_per_step_is_a_multiple_of_the_data_shards_and_pad_share_is_measured():
    examples = _examples(n=41)
    plan, it = _loader(examples, 8, seed=0, row_multiple=4)
    assert plan.rows_per_step % 4 == 0
    batches = list(it)
    slots = sum(b["segment_ids"].size for b in batches)
    np.testing.assert_allclose(plan.pad_share,
                               sum((b["segment_ids"] == 0).sum() for b in batches) / slots)


def test_epochs_are_reshuffled():
    _, it = _loader(_examples(n=12), 1, seed=0, packing=False, epochs=2)
    order = _seen(list(it))
    assert sorted(order[:12]) == sorted(order[12:]) == list(range(12)) and order[:12] != order[12:]


def test_token_cut_is_redrawn_every_epoch_independent_of_hosts():
    ex = TokenizedExample(np.arange(1, 41, dtype=np.int32), prompt_len=3, cut_len=30, max_cut=30)
    draws = [loader.draw_cut(ex, seed=0, epoch=e, index=5) for e in range(20)]
    assert len(set(draws)) > 5 and all(0 <= d <= 30 for d in draws)
    assert loader.draw_cut(ex, 0, 3, 5) == draws[3]
    assert loader.draw_cut(TokenizedExample(ex.tokens, 3), 0, 3, 5) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(seq_len=2), "example 0 has a 2-token prompt"),
])
def test_bad_loader_arguments(kwargs, match):
    args = dict(examples=_examples(), batch_size=2, seq_len=SEQ, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        loader.make_plan(**args)
    with pytest.raises(ValueError, match="no examples"):
        loader.make_plan([], 2, SEQ, 0)
