"""The statistics of the bench report: paired t-intervals over seeds and Pareto dominance."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from scipy import stats

K = TypeVar("K", bound=Hashable)  # a point's name

CONFIDENCE = 0.95


@dataclass
class PairedInterval:
    """Mean of paired differences and its two-sided t-interval."""

    n: int
    mean: float
    low: float | None  # None with fewer than 2 pairs
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_t_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedInterval:
    """Interval for the mean of ``a[i] - b[i]`` (pairs: same seed): ``d̄ ± t_{(1+c)/2, n-1} s_d / sqrt(n)``.

    Seeds are the unit of replication; with 3-5 of them a rank test cannot reach significance, the
    t-interval can (it assumes the differences are roughly normal)."""
    if len(a) != len(b):
        raise ValueError("paired values need the same length")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return PairedInterval(0, math.nan, None, None)
    mean = sum(d) / n
    if n < 2:
        return PairedInterval(n, mean, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return PairedInterval(n, mean, mean - half, mean + half)


def dominated_by(points: Mapping[K, Sequence[float]], higher_is_better: Sequence[bool]) -> dict[K, list[K]]:
    """For every point, the points that dominate it: at least as good on every objective and better on
    one (``higher_is_better`` per objective). An empty list: on the Pareto front."""
    sign = [1.0 if h else -1.0 for h in higher_is_better]
    out: dict[K, list[K]] = {}
    for name, p in points.items():
        mine = [s * v for s, v in zip(sign, p)]
        out[name] = []
        for other, q in points.items():
            if other == name:
                continue
            theirs = [s * v for s, v in zip(sign, q)]
            if all(t >= m for t, m in zip(theirs, mine)) and any(t > m for t, m in zip(theirs, mine)):
                out[name].append(other)
    return out
