"""Uncertainty of the report's rates: counts and 95% Wilson score intervals.

A rate of k out of n (ASR, accuracy, over-refusal) is reported with n and the Wilson score
interval, which stays inside [0, 1] and is sensible at 0 of n and n of n (where the normal
approximation collapses to a zero-width interval):

    (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),   p = k/n, z = 1.959964 (95%)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95%


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials, as fractions in [0, 1]."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"Wilson interval of {k} of {n}: expected 0 <= k <= n and n >= 1")
    p, z2 = k / n, z * z
    center = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    scale = 1 + z2 / n
    low = 0.0 if k == 0 else (center - half) / scale  # exact ends: no rounding noise at 0 and n
    high = 1.0 if k == n else (center + half) / scale
    return low, high


def rate(values: Sequence[bool]) -> dict[str, Any] | None:
    """{"pct", "k", "n", "ci95": [low %, high %]} of a list of outcomes; None when it is empty.
    The interval keeps 4 decimals so that printing it with 1 is not a second rounding."""
    if not values:
        return None
    k, n = sum(bool(v) for v in values), len(values)
    low, high = wilson_interval(k, n)
    return {"pct": round(100.0 * k / n, 2), "k": k, "n": n,
            "ci95": [round(100.0 * low, 4), round(100.0 * high, 4)]}
