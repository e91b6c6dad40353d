"""Statistics of test results, shared by ``reproduce`` and the report."""

from __future__ import annotations


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (fractions): good near 0 and 1,
    unlike the normal approximation. Through ``scipy.stats.binomtest``."""
    from scipy.stats import binomtest

    interval = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)
