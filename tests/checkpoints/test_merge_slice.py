"""checkpoints/resolve.py merge_slice: one shard of W + scale * (A @ B).reshape(W.shape), from
only that shard of W and the rows / columns of A and B it needs, for every kernel layout."""
import numpy as np
import pytest

from derta_jax.checkpoints.resolve import merge_slice

R = 3
LAYOUTS = {  # kernel shape, lead (Mixtral's expert axis), number of input dims
    "q_proj [D, H, Dh]": ((6, 4, 2), 0, 1),
    "o_proj [H, Dh, D]": ((4, 2, 6), 0, 2),
    "mlp [D, F]": ((6, 10), 0, 1),
    "experts [E, D, F]": ((3, 6, 10), 1, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_merged_slice_is_that_slice_of_the_literal_merge(layout):
    shape, lead, n_in = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    fan_in, fan_out = np.prod(shape[lead:lead + n_in]), np.prod(shape[lead + n_in:])
    a = rng.standard_normal(shape[:lead] + (fan_in, R)).astype(np.float32)
    b = rng.standard_normal(shape[:lead] + (R, fan_out)).astype(np.float32)
    literal = w + 0.5 * (a.astype(np.float64) @ b).reshape(shape)
    cuts = [(), (slice(0, shape[0] // 2),), (slice(None), slice(1, shape[1])),
            tuple(slice(1, n) for n in shape), (slice(None),) * len(shape)]
    for index in cuts:
        got = merge_slice(w[index], a, b, 0.5, shape, index)
        np.testing.assert_allclose(got, literal[index], rtol=1e-5, atol=1e-5, err_msg=str(index))
        assert got.dtype == w.dtype


def test_adapters_that_do_not_fit_the_kernel_are_refused():
    w = np.zeros((6, 10), np.float32)
    with pytest.raises(ValueError, match=r"do not fit a kernel of \(6, 10\)"):
        merge_slice(w, np.zeros((5, R)), np.zeros((R, 10)), 1.0, w.shape)
