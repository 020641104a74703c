"""Pure statistics over request records: percentiles, latency summary, load balance, the run summary.

No I/O and no numpy, so that every figure in a results file can be checked by hand in a unit test.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.record import NO_RESPONSE, Record

SUMMARY_KEYS = (
    "requests",
    "successful",
    "failed",
    "failed_by_status",
    "duration_s",
    "throughput_rps",
    "latency_ms",
    "nodes",
    "balance",
    "mean_batch_size",
    "client_cpu_percent",
)
LATENCY_KEYS = ("mean", "p50", "p95", "p99", "p999", "max", "std")
BALANCE_KEYS = ("max_over_mean", "cv")


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending ``ordered``, interpolated linearly between ranks.

    The same definition as ``numpy.percentile``'s default ("linear"): rank ``q/100 * (n-1)``.
    NaN for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    if not ordered:
        return math.nan
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float]:
    """Mean, p50/p95/p99/p99.9, max and the population standard deviation, in ms (NaN when empty)."""
    ordered = sorted(latencies_ms)
    n = len(ordered)
    if n == 0:
        return dict.fromkeys(LATENCY_KEYS, math.nan)
    mean = math.fsum(ordered) / n
    variance = math.fsum((x - mean) ** 2 for x in ordered) / n
    return {
        "mean": mean,
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "p999": percentile(ordered, 99.9),
        "max": ordered[-1],
        "std": math.sqrt(variance),
    }


def balance(counts: Mapping[str, int]) -> dict[str, float]:
    """How evenly load is spread: max/mean (1.0 is perfect) and the coefficient of variation.

    CV is the population standard deviation over the mean. Every node in ``counts`` counts,
    including nodes with 0; NaN when there is no load at all.
    """
    values = list(counts.values())
    total = sum(values)
    if not values or total == 0:
        return {"max_over_mean": math.nan, "cv": math.nan}
    mean = total / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return {"max_over_mean": max(values) / mean, "cv": std / mean}


def mean_batch_size(batch_sizes: Iterable[int]) -> float:
    """Mean rows per forward pass as the workers saw them, from the sizes requests report.

    A forward of b single-row requests is reported b times, once by each of them, so the number
    of forwards is the sum of 1/b over requests: the workers' mean is the harmonic mean of the
    reported sizes (a plain mean would over-weight big batches). NaN when nothing was reported.
    """
    sizes = [b for b in batch_sizes if b > 0]
    if not sizes:
        return math.nan
    return len(sizes) / math.fsum(1 / b for b in sizes)


def status_key(record: Record) -> str:
    """How a failure is filed in ``failed_by_status``: the HTTP status, or why there was none."""
    if record.status == NO_RESPONSE:
        return "no_response"
    if record.status == 200:
        return "invalid_body"
    return str(record.status)


def summarize(records: Sequence[Record], client_cpu_s: float) -> dict[str, Any]:
    """The summary of one run, with exactly :data:`SUMMARY_KEYS`.

    ``duration_s`` runs from the first request's start to the last one's end; throughput counts
    successful requests only. ``client_cpu_percent`` is the load generator's CPU time
    (``client_cpu_s``) over that wall time, in percent of one core (above 100 with several
    client processes).
    """
    ok = [r for r in records if r.ok]
    duration = (max(r.end_s for r in records) - min(r.start_s for r in records)) if records else 0.0
    nodes = Counter(r.node for r in ok if r.node is not None)
    failed = Counter(status_key(r) for r in records if not r.ok)
    return {
        "requests": len(records),
        "successful": len(ok),
        "failed": len(records) - len(ok),
        "failed_by_status": dict(sorted(failed.items())),
        "duration_s": duration,
        "throughput_rps": len(ok) / duration if duration > 0 else 0.0,
        "latency_ms": latency_summary(r.latency_ms for r in ok),
        "nodes": dict(sorted(nodes.items())),
        "balance": balance(nodes),
        "mean_batch_size": mean_batch_size(r.batch_size for r in ok if r.batch_size is not None),
        "client_cpu_percent": 100 * client_cpu_s / duration if duration > 0 else 0.0,
    }


def histogram(values: Iterable[float], bins_per_decade: int = 20) -> dict[str, list[float]]:
    """Log-spaced counts of positive ``values`` (latencies in ms), for runs too big to keep raw.

    ``edges`` has one more entry than ``counts``; bin i holds ``edges[i] <= v < edges[i+1]``.
    """
    counts: Counter[int] = Counter()
    for v in values:
        counts[math.floor(math.log10(max(v, 1e-3)) * bins_per_decade)] += 1
    if not counts:
        return {"edges": [], "counts": []}
    low, high = min(counts), max(counts)
    return {
        "edges": [10 ** (i / bins_per_decade) for i in range(low, high + 2)],
        "counts": [counts.get(i, 0) for i in range(low, high + 1)],
    }
