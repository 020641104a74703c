"""The router and the circuit breaker, without Redis: bounded loads, full workers, sick workers."""

from __future__ import annotations

import pytest

from app.breaker import Breaker
from app.routing import Router, WorkerFull
from hashing.membership import Member
from hashing.ring import EmptyRingError, Ring


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def members(*nodes: str, run: str = "r1") -> dict[str, Member]:
    return {n: Member(1.0, run) for n in nodes}


def router(load_factor: float = 1.25, max_in_flight: int = 10_000, breaker: Breaker | None = None) -> Router:
    r = Router(150, load_factor, max_in_flight, breaker or Breaker(3, 5.0))
    r.set_members(members("w1", "w2", "w3", "w4"))
    return r


def test_empty_router_raises() -> None:
    with pytest.raises(EmptyRingError):
        Router(150, 1.25, 10, Breaker(3, 5.0)).acquire("k")


def test_idle_router_follows_the_ring() -> None:
    ring = Ring(150)
    for n in ("w1", "w2", "w3", "w4"):
        ring.add(n)
    r = router()
    for i in range(200):
        node = r.acquire(f"user-{i}")
        assert node == ring.lookup(f"user-{i}")
        r.release(node, ok=True)


def test_a_hot_key_spills_but_no_node_exceeds_the_bound() -> None:
    r = router(load_factor=1.25)
    nodes = [r.acquire("hot") for _ in range(400)]
    counts = {n: nodes.count(n) for n in set(nodes)}
    assert len(counts) == 4
    assert max(counts.values()) <= 1.25 * 400 / 4 + 1


def test_without_bounded_loads_a_hot_key_stays_on_one_node() -> None:
    r = router(load_factor=0)
    assert len({r.acquire("hot") for _ in range(100)}) == 1


def test_a_full_worker_is_refused() -> None:
    r = router(load_factor=0, max_in_flight=2)
    node = r.acquire("k")
    assert r.acquire("k") == node
    with pytest.raises(WorkerFull) as full:
        r.acquire("k")
    assert full.value.node == node
    r.release(node, ok=True)
    assert r.acquire("k") == node


def test_breaker_opens_after_repeated_failures_and_half_opens_after_cooldown() -> None:
    clock = Clock()
    b = Breaker(3, 5.0, clock)
    for _ in range(2):
        b.record("w1", ok=False)
    assert b.blocked() == frozenset()
    b.record("w1", ok=False)
    assert b.blocked() == {"w1"}
    clock.now = 5.0  # half-open: traffic resumes...
    assert b.blocked() == frozenset()
    b.record("w1", ok=False)  # ...and the first failure opens it again at once
    assert b.blocked() == {"w1"}
    clock.now = 10.0
    b.record("w1", ok=True)  # a success closes it
    b.record("w1", ok=False)
    assert b.blocked() == frozenset()


def test_router_routes_around_an_open_breaker() -> None:
    clock = Clock()
    r = router(load_factor=0, breaker=Breaker(2, 5.0, clock))
    key = next(f"k{i}" for i in range(1000) if r.acquire(f"k{i}") == "w2")
    r.release("w2", ok=False)
    r.release("w2", ok=False)
    assert r.acquire(key) != "w2"
    clock.now = 6.0
    assert r.acquire(key) == "w2"


def test_all_breakers_open_still_routes() -> None:
    clock = Clock()
    r = Router(150, 0, 100, Breaker(1, 5.0, clock))
    r.set_members(members("w1"))
    r.release(r.acquire("k"), ok=False)
    assert r.acquire("k") == "w1"  # better a sick worker than none


def test_set_members_reports_departures_and_restarts() -> None:
    r = router()
    assert r.set_members(members("w1", "w2", "w3", "w4")) == set()
    changed = {**members("w1", "w2"), **members("w3", run="r2")}
    assert r.set_members(changed) == {"w3", "w4"}  # w3 restarted, w4 left
    assert set(r.members) == {"w1", "w2", "w3"}
