"""A worker's share of /metrics: what each batch computed, as counts for :data:`tasks.contract.METRICS_KEY`.

The consumer adds them to the pipeline that already carries the batch's replies, so they cost no
round trip, and they reach Redis with the answers they count: a gateway that has its answer can
already scrape its batch. Names and units are Triton's (see app/exposition.py): rows, forward
passes, and per computed request the time it waited for its batch and its forward's duration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.contract import latency_le, series_field


@dataclass(frozen=True)
class Forward:
    """One forward pass: its rows, the requests it answered, its duration (seconds)."""

    rows: int
    requests: int
    seconds: float


def batch_counts(model: str, version: str, forwards: Sequence[Forward], waits_s: Sequence[float]) -> Counter[str]:
    """Counts of one batch of ``model`` ``version``: its forward passes (one, or one per request after
    the batch's own failed) and, per computed request, how long it waited from its message's arrival
    to its forward's start. Triton adds a forward's duration once per request it computed."""
    counts: Counter[str] = Counter()
    counts[series_field("nv_inference_count", model, version)] = sum(f.rows for f in forwards)
    counts[series_field("nv_inference_exec_count", model, version)] = len(forwards)
    for f in forwards:
        us = round(f.seconds * 1e6)
        counts[series_field("nv_inference_compute_infer_duration_us", model, version)] += us * f.requests
        counts[series_field("ringserve_batch_compute_seconds_bucket", model, version, latency_le(f.seconds))] += 1
        counts[series_field("ringserve_batch_compute_seconds_sum_us", model, version)] += us
    for wait in waits_s:
        counts[series_field("nv_inference_queue_duration_us", model, version)] += round(wait * 1e6)
        counts[series_field("ringserve_queue_wait_seconds_bucket", model, version, latency_le(wait))] += 1
    return +counts
