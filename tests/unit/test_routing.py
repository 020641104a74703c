"""The router and the circuit breaker, without Redis: bounded loads, full workers, sick workers."""

from __future__ import annotations

import time

import pytest

from app.breaker import Breaker
from app.routing import Lease, Router, WorkerFull
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
        lease = r.acquire(f"user-{i}")
        assert lease.node == ring.lookup(f"user-{i}")
        r.release(lease, ok=True)


def test_a_hot_key_spills_but_no_node_exceeds_the_bound() -> None:
    r = router(load_factor=1.25)
    nodes = [r.acquire("hot").node for _ in range(400)]
    counts = {n: nodes.count(n) for n in set(nodes)}
    assert len(counts) == 4
    assert max(counts.values()) <= 1.25 * 400 / 4 + 1


def test_without_bounded_loads_a_hot_key_stays_on_one_node() -> None:
    r = router(load_factor=0)
    assert len({r.acquire("hot").node for _ in range(100)}) == 1


def test_a_full_worker_is_refused() -> None:
    r = router(load_factor=0, max_in_flight=2)
    lease = r.acquire("k")
    assert r.acquire("k").node == lease.node
    with pytest.raises(WorkerFull) as full:
        r.acquire("k")
    assert full.value.node == lease.node
    r.release(lease, ok=True)
    assert r.acquire("k").node == lease.node


def test_breaker_opens_after_repeated_failures_and_half_opens_after_cooldown() -> None:
    clock = Clock()
    b = Breaker(3, 5.0, clock)
    for _ in range(2):
        b.record("w1", ok=False)
    assert b.blocked() == frozenset()
    b.record("w1", ok=False)
    assert b.blocked() == {"w1"}
    clock.now = 5.0  # half-open: back for one probe...
    assert b.blocked() == frozenset()
    ticket = b.try_probe("w1")
    assert ticket is not None
    b.end_probe("w1", ticket, ok=False)  # ...whose failure opens it again at once
    assert b.blocked() == {"w1"}
    clock.now = 10.0
    b.end_probe("w1", b.try_probe("w1") or 0, ok=True)  # a successful probe closes it
    b.record("w1", ok=False)
    assert b.blocked() == frozenset()


def test_router_routes_around_an_open_breaker() -> None:
    clock = Clock()
    r = router(load_factor=0, breaker=Breaker(2, 5.0, clock))
    key = next(f"k{i}" for i in range(1000) if r.acquire(f"k{i}").node == "w2")
    r.release(Lease("w2", 1), ok=False)
    r.release(Lease("w2", 1), ok=False)
    assert r.acquire(key).node != "w2"
    clock.now = 6.0
    assert r.acquire(key).node == "w2"


def open_w2(clock: Clock) -> tuple[Router, list[str]]:
    """A router over w1..w4 (plain ring) with w2's breaker just opened; keys w2 owns."""
    r = router(load_factor=0, breaker=Breaker(1, 5.0, clock))
    w2_keys = [k for k in (f"k{i}" for i in range(2000)) if r.acquire(k).node == "w2"][:20]
    r.release(Lease("w2", 1), ok=False)
    assert r.open_breakers() == ["w2"]
    return r, w2_keys


def test_half_open_admits_one_probe_and_keeps_the_node_out_meanwhile() -> None:
    clock = Clock()
    r, keys = open_w2(clock)
    clock.now = 5.0
    probe = r.acquire(keys[0])
    assert probe.node == "w2" and probe.probe is not None
    clock.now = 6.0
    assert "w2" not in {r.acquire(k).node for k in keys}  # everyone else routes around the probe
    r.release(probe, ok=True)
    assert r.open_breakers() == []
    assert {r.acquire(k).node for k in keys} == {"w2"}


def test_a_failed_probe_reopens_for_a_new_cooldown() -> None:
    clock = Clock()
    r, keys = open_w2(clock)
    clock.now = 5.0
    probe = r.acquire(keys[0])
    clock.now = 7.0
    r.release(probe, ok=False)
    clock.now = 11.9
    assert "w2" not in {r.acquire(k).node for k in keys}
    clock.now = 12.0
    assert r.acquire(keys[1]).node == "w2"  # the next probe
    assert r.open_breakers() == ["w2"]


def test_a_probe_without_verdict_lets_the_next_request_probe() -> None:
    clock = Clock()
    r, keys = open_w2(clock)
    clock.now = 5.0
    first = r.acquire(keys[0])
    assert "w2" not in {r.acquire(k).node for k in keys[1:]}
    r.release(first, ok=None)  # e.g. the client's own deadline: says nothing about w2
    second = r.acquire(keys[1])
    assert second.node == "w2" and second.probe not in (None, first.probe)
    assert r.open_breakers() == ["w2"]


def test_verdicts_of_requests_sent_before_the_breaker_opened_are_ignored() -> None:
    clock = Clock()
    r = router(load_factor=0, breaker=Breaker(1, 5.0, clock))
    key = next(k for k in (f"k{i}" for i in range(2000)) if r.acquire(k).node == "w2")
    stale = [r.acquire(key) for _ in range(3)]
    r.release(stale[0], ok=False)  # opens
    r.release(stale[1], ok=True)  # sent before: it cannot close the breaker
    clock.now = 5.0
    probe = r.acquire(key)
    assert probe.probe is not None
    r.release(stale[2], ok=None)  # nor free the probe's slot
    assert r.acquire(key).node != "w2"
    r.release(probe, ok=True)
    assert r.open_breakers() == []


def test_a_restarted_worker_starts_with_a_closed_breaker() -> None:
    clock = Clock()
    r, keys = open_w2(clock)
    clock.now = 5.0
    probe = r.acquire(keys[0])
    r.set_members({**members("w1", "w3", "w4"), **members("w2", run="r2")})  # w2 restarted
    assert r.open_breakers() == []
    assert r.acquire(keys[0]).node == "w2"
    r.release(probe, ok=None)  # the old run's probe ends: nothing changes
    assert r.open_breakers() == []


def test_all_breakers_open_still_routes() -> None:
    clock = Clock()
    r = Router(150, 0, 100, Breaker(1, 5.0, clock))
    r.set_members(members("w1"))
    r.release(r.acquire("k"), ok=False)
    assert r.acquire("k").node == "w1"  # better a sick worker than none


def test_set_members_reports_departures_and_restarts() -> None:
    r = router()
    assert r.set_members(members("w1", "w2", "w3", "w4")) == set()
    changed = {**members("w1", "w2"), **members("w3", run="r2")}
    assert r.set_members(changed) == {"w3", "w4"}  # w3 restarted, w4 left
    assert set(r.members) == {"w1", "w2", "w3"}


def test_light_load_keeps_every_key_on_its_owner() -> None:
    """16 requests in flight at a time, keys uniform: below one batch per worker nothing spills."""
    r = router()
    ring = Ring.from_nodes(dict.fromkeys(("w1", "w2", "w3", "w4"), 1.0))
    held = [r.acquire(f"user-{i}", rows=1, floor_rows=32) for i in range(16)]
    for i in range(16, 3000):
        lease = r.acquire(f"user-{i}", rows=1, floor_rows=32)
        assert lease.node == ring.lookup(f"user-{i}") and not lease.spilled
        held.append(lease)
        r.release(held.pop(0), ok=True)


def test_a_hot_key_spills_only_above_one_batch_and_is_marked() -> None:
    r = router()
    leases = [r.acquire("hot", rows=4, floor_rows=32) for _ in range(8)]  # 32 rows: one batch
    assert {lease.node for lease in leases} == {leases[0].node} and not any(lease.spilled for lease in leases)
    extra = r.acquire("hot", rows=4, floor_rows=32)
    assert extra.node != leases[0].node and extra.spilled
    assert r.rows_in_flight() == {leases[0].node: 32, extra.node: 4}


def test_other_gateways_rows_count_while_fresh() -> None:
    """Bounded loads weigh what the other gateway processes reported, but never a stale report."""
    r = router()
    owner = r.acquire("hot").node
    r.release(Lease(owner, 1), ok=True)
    others = {owner: 100, **{n: 0 for n in ("w1", "w2", "w3", "w4") if n != owner}}
    r.set_others_rows(others, time.monotonic())
    spilled = r.acquire("hot", rows=1, floor_rows=32)
    assert spilled.node != owner and spilled.spilled
    r.set_others_rows(others, time.monotonic() - 10)  # long gone: only this process's rows count
    assert r.acquire("hot", rows=1, floor_rows=32).node == owner


def test_a_silent_worker_that_still_answers_keeps_its_keys() -> None:
    """Missed heartbeats alone (a loaded machine) move no key; silent and quiet, it is routed around."""
    clock = Clock()
    r = Router(150, 1.25, 10_000, Breaker(3, 5.0, clock), clock)
    r.set_members(members("w1", "w2", "w3", "w4"))
    key = next(f"k{i}" for i in range(1000) if r.acquire(f"k{i}").node == "w2")
    r.release(r.acquire(key), ok=True)  # w2 just answered
    r.set_silent({"w2"})
    assert r.acquire(key).node == "w2" and r.take_quiet() == set()
    clock.now += 10  # its last answer is 10 s old
    assert r.take_quiet() == {"w2"} and r.take_quiet() == set()  # handed over once
    assert r.acquire(key).node != "w2"
    r.set_silent(set())  # it beats again
    assert r.acquire(key).node == "w2"
