"""The batching policy against a fake clock: no sleeps, no Celery."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.batching import BatchPolicy, Collector

POLICY = BatchPolicy(max_batch_size=32, max_delay_ms=20, idle_ms=2)


def collector(policy: BatchPolicy = POLICY) -> Collector[str]:
    return Collector(lambda key: policy)


def test_full_batch_flushes_at_once() -> None:
    c = collector()
    ready = []
    for i in range(32):
        ready += c.add("m", f"r{i}", 1, now=0.0)
    assert len(ready) == 1 and ready[0].rows == 32
    assert ready[0].items == [f"r{i}" for i in range(32)]
    assert len(c) == 0 and c.next_wakeup() is None


def test_rows_count_toward_the_limit() -> None:
    c = collector()
    assert c.add("m", "a", 20, now=0.0) == []
    ready = c.add("m", "b", 20, now=0.0)  # would overflow: "a" leaves alone
    assert [(b.items, b.rows) for b in ready] == [(["a"], 20)]
    assert len(c) == 1


def test_oldest_request_waits_at_most_max_delay() -> None:
    c = collector()
    t = 0.0
    c.add("m", "first", 1, now=t)
    while True:  # a steady trickle, one request per ms: the idle gap never opens
        t += 0.001
        if c.due(t):
            break
        c.add("m", "more", 1, now=t)
    assert t == pytest.approx(0.020, abs=1e-9)


def test_idle_gap_closes_a_batch_early() -> None:
    c = collector()
    c.add("m", "a", 1, now=0.0)
    c.add("m", "b", 1, now=0.001)
    assert c.next_wakeup() == pytest.approx(0.003)
    assert c.due(0.0029) == []
    [batch] = c.due(0.003)
    assert batch.items == ["a", "b"]


def test_without_idle_gap_waits_the_full_delay() -> None:
    c = collector(BatchPolicy(max_batch_size=32, max_delay_ms=20, idle_ms=20))
    c.add("m", "a", 1, now=0.0)
    assert c.due(0.019) == []
    assert [b.items for b in c.due(0.020)] == [["a"]]


def test_groups_are_separate_per_key() -> None:
    c = Collector(lambda key: BatchPolicy(2 if key == "small" else 32, 20, 20))
    assert c.add("big", "x", 1, now=0.0) == []
    [batch] = c.add("small", "y", 2, now=0.0)
    assert batch.key == "small" and batch.items == ["y"]
    assert len(c) == 1


def test_oversized_item_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        collector().add("m", "x", 33, now=0.0)


def test_drain_returns_everything() -> None:
    c = collector()
    c.add("a", 1, 1, now=0.0)
    c.add("b", 2, 1, now=0.0)
    assert sorted(b.key for b in c.drain()) == ["a", "b"]
    assert len(c) == 0


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(0, 20, 2)
    with pytest.raises(ValueError):
        BatchPolicy(4, -1, 2)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 40),
    arrivals=st.lists(st.tuples(st.integers(1, 40), st.floats(0, 0.05)), max_size=80),
)
def test_every_item_leaves_exactly_once_in_order_and_within_limit(
    limit: int, arrivals: list[tuple[int, float]]
) -> None:
    c = Collector(lambda key: BatchPolicy(limit, 20, 2))
    out: list[int] = []
    now, sent = 0.0, 0
    for i, (rows, gap) in enumerate(arrivals):
        now += gap
        for batch in c.due(now):
            out += batch.items
            assert batch.rows <= limit
        rows = min(rows, limit)
        for batch in c.add("m", i, rows, now):
            out += batch.items
            assert batch.rows <= limit
        sent += 1
        wake = c.next_wakeup()
        assert wake is None or wake <= now + 0.020 + 1e-9
    out += [item for batch in c.drain() for item in batch.items]
    assert out == list(range(sent))
