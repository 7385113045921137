"""What the server's parts count as they work, for the metrics endpoint to read.

Plain numbers kept in the objects that do the work (no locks, no registry, nothing
global): an ``int`` or a :class:`collections.Counter` keyed by a bounded label value
where a count is needed, and a :class:`Histogram` for durations and sizes.
:mod:`securechat.metrics` reads them when it is scraped; nothing here knows Prometheus.
Counting costs an addition, and is done per batch or per broadcast, never per
recipient.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Upper bounds (seconds) for latencies from a millisecond to ten seconds: store
# commits (SQLite's fsync, a Redis round trip) and history replays.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Upper bounds for a store batch's size (units of writes in one commit; at most 1024).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Observations counted into buckets by upper bound, with their sum (as Prometheus
    histograms are: ``le`` is inclusive). ``counts[i]`` is the number of observations in
    bucket ``i`` alone; the last bucket is everything above the largest bound."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be distinct and increasing")
        self.bounds = tuple(float(bound) for bound in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of observations <= le)`` for each bound, then ``+Inf``."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            buckets.append((_float_text(bound), running))
        buckets.append(("+Inf", self.count))
        return buckets


def _float_text(value: float) -> str:
    return repr(value)
