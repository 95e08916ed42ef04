"""The Wilson score interval against values computed by hand from the formula
(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964."""
import pytest

from derta_jax.evaluation import stats


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.2775),  # 0 of n: the interval still has width (not [0, 0])
    (5, 10, 0.2366, 0.7634),
    (20, 24, 0.6415, 0.9332),
    (10, 10, 0.7225, 1.0),
    (1, 4, 0.0456, 0.6994),
    (1, 1, 0.2065, 1.0),
])
def test_wilson_interval_matches_hand_computed_values(k, n, low, high):
    got = stats.wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_ends_are_exact_at_0_and_n():
    assert stats.wilson_interval(0, 7)[0] == 0.0 and stats.wilson_interval(7, 7)[1] == 1.0


def test_rate_gives_percent_count_and_interval():
    assert stats.rate([True, False, False, False]) == {
        "pct": 25.0, "k": 1, "n": 4, "ci95": [4.5587, 69.9358]}
    assert stats.rate([]) is None


@pytest.mark.parametrize("k, n", [(0, 0), (3, 2), (-1, 4)])
def test_wilson_interval_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match=f"{k} of {n}"):
        stats.wilson_interval(k, n)
