"""Percentiles and latency curves from raw nanosecond samples."""

from __future__ import annotations

from collections.abc import Iterable

# Quantiles kept for the latency plot (a CDF with a detailed tail).
CURVE = (
    0.0, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0,
    97.5, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
)  # fmt: skip


def quantile(ordered: list[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0
    rank = round(q / 100 * (len(ordered) - 1))
    return ordered[min(len(ordered) - 1, max(0, rank))]


def latency_ms(samples_ns: Iterable[int], *, curve: bool = True) -> dict[str, object]:
    """p50/p90/p99/p99.9/max (and a CDF curve) in milliseconds."""
    ordered = sorted(samples_ns)
    figures: dict[str, object] = {"samples": len(ordered)}
    for name, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9), ("max", 100.0)):
        figures[name] = round(quantile(ordered, q) / 1e6, 3)
    if curve and ordered:
        figures["curve"] = [[q, round(quantile(ordered, q) / 1e6, 3)] for q in CURVE]
    return figures


def per_second(count: float, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
