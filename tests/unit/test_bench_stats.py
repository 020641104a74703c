"""The benchmark's statistics, checked by hand: percentiles, latency summary, balance, the summary's keys."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench.record import NO_RESPONSE, Record
from bench.stats import (
    BALANCE_KEYS,
    LATENCY_KEYS,
    SUMMARY_KEYS,
    balance,
    histogram,
    latency_summary,
    mean_batch_size,
    percentile,
    summarize,
)


def test_percentile_interpolates_between_ranks() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 50) == 25.0  # rank 1.5
    assert percentile(values, 90) == pytest.approx(37.0)  # rank 2.7


def test_percentile_agrees_with_numpy() -> None:
    rng = random.Random(7)
    values = sorted(rng.expovariate(1 / 5) for _ in range(1001))
    for q in (1, 50, 95, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99.9) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary() -> None:
    summary = latency_summary([4.0, 1.0, 3.0, 2.0])
    assert tuple(summary) == LATENCY_KEYS
    assert summary["mean"] == 2.5
    assert summary["p50"] == 2.5
    assert summary["max"] == 4.0
    assert summary["std"] == pytest.approx(math.sqrt(1.25))  # population standard deviation
    assert all(math.isnan(v) for v in latency_summary([]).values())


def test_balance_of_even_and_uneven_loads() -> None:
    assert balance({"a": 10, "b": 10, "c": 10}) == {"max_over_mean": 1.0, "cv": 0.0}
    uneven = balance({"a": 30, "b": 10, "c": 20})  # mean 20, population std sqrt(200/3)
    assert tuple(uneven) == BALANCE_KEYS
    assert uneven["max_over_mean"] == 1.5
    assert uneven["cv"] == pytest.approx(math.sqrt(200 / 3) / 20)


def test_balance_counts_idle_nodes_and_no_load_is_nan() -> None:
    assert balance({"a": 10, "b": 0})["max_over_mean"] == 2.0
    assert all(math.isnan(v) for v in balance({}).values())
    assert all(math.isnan(v) for v in balance({"a": 0}).values())


def test_mean_batch_size_is_the_workers_view() -> None:
    # one forward of 4 rows (reported by its 4 requests) and two forwards of 1 row: 6 rows in 3 forwards
    assert mean_batch_size([4, 4, 4, 4, 1, 1]) == pytest.approx(2.0)
    assert math.isnan(mean_batch_size([]))


def test_summary_has_exactly_the_specified_keys() -> None:
    records = [
        Record(0.0, 0.010, 200, "worker_1", 2, False),
        Record(0.0, 0.020, 200, "worker_2", 2, False),
        Record(0.5, 0.530, 200, "worker_1", 1, False),
        Record(0.6, 0.700, 503, error="no worker is alive"),
        Record(0.7, 1.000, NO_RESPONSE, error="TimeoutError"),
        Record(0.8, 0.900, 200, error="no output"),
    ]
    summary = summarize(records, client_cpu_s=0.125)
    assert tuple(summary) == SUMMARY_KEYS
    assert tuple(summary["latency_ms"]) == LATENCY_KEYS
    assert tuple(summary["balance"]) == BALANCE_KEYS
    assert summary["requests"] == 6
    assert summary["successful"] == 3
    assert summary["failed"] == 3
    assert summary["failed_by_status"] == {"503": 1, "invalid_body": 1, "no_response": 1}
    assert summary["duration_s"] == 1.0
    assert summary["throughput_rps"] == 3.0
    assert summary["latency_ms"]["max"] == pytest.approx(30.0)
    assert summary["nodes"] == {"worker_1": 2, "worker_2": 1}
    assert summary["balance"]["max_over_mean"] == pytest.approx(2 / 1.5)
    assert summary["mean_batch_size"] == pytest.approx(1.5)  # 2 forwards (2 rows, 1 row) over 3 requests
    assert summary["client_cpu_percent"] == pytest.approx(12.5)  # 0.125 CPU s over 1 s


def test_summary_of_nothing() -> None:
    summary = summarize([], client_cpu_s=0.0)
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["requests"] == 0 and summary["throughput_rps"] == 0.0


def test_histogram_counts_every_value_in_log_bins() -> None:
    h = histogram([1.0, 1.05, 10.0, 99.0], bins_per_decade=10)
    assert sum(h["counts"]) == 4
    assert len(h["edges"]) == len(h["counts"]) + 1
    assert h["edges"][0] <= 1.0 < h["edges"][1]
    assert h["edges"][-2] <= 99.0 < h["edges"][-1]
    assert histogram([]) == {"edges": [], "counts": []}
