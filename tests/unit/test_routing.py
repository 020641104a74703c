"""The router and the circuit breaker, without Redis: bounded loads, full workers, sick workers."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_busy_gateway_processes_share_the_batch_floor() -> None:
    """With one other busy gateway process, each keeps a worker within half a batch, so that
    together they stay within one; alone again, a process has the whole batch."""
    r = router()
    r.set_peers(1)
    owned = [r.acquire("hot", rows=1, floor_rows=32) for _ in range(16)]
    assert {lease.node for lease in owned} == {owned[0].node} and not any(lease.spilled for lease in owned)
    assert r.acquire("hot", rows=1, floor_rows=32).spilled
    r.set_peers(0)
    assert r.acquire("hot", rows=1, floor_rows=32).node == owned[0].node


def test_processes_started_together_share_the_batch_floor_before_any_report() -> None:
    """Two gateway processes started on one host split the batch from their first request, before
    either has reported: otherwise both could fill a worker with a whole batch at once."""
    r = Router(150, 1.25, 10_000, Breaker(3, 5.0), processes=2)
    r.set_members(members("w1", "w2", "w3", "w4"))
    owned = [r.acquire("hot", rows=1, floor_rows=32) for _ in range(16)]
    assert not any(lease.spilled for lease in owned)
    assert r.acquire("hot", rows=1, floor_rows=32).spilled
    r.set_peers(3)  # more report rows in flight than were started here (gateways elsewhere): a quarter each
    r.release(owned.pop(), ok=True)
    assert r.acquire("hot", rows=1, floor_rows=32).spilled


@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 400), st.integers(1, 4)), min_size=50, max_size=400),
    st.integers(1, 3),
)
@settings(max_examples=60, deadline=None)
def test_busy_processes_together_keep_every_worker_within_one_batch(
    steps: list[tuple[int, int, int]], processes: int
) -> None:
    """Gateway processes that each have few rows in flight (as with a thread per request: below
    what bounded loads' share would allow a worker beyond the batch floor) keep every worker,
    summed over all of them, within one batch at every moment, whatever is released when: the
    bound the hotkey scenario samples. A step admits a request (some keys hot) of 1-4 rows, or,
    one in five or when the process is full, releases that process's oldest."""
    nodes, batch, per_process = ("w1", "w2", "w3"), 32, 24  # 1.25 × 24 / 3 workers < 32 / 3 processes
    routers = [Router(150, 1.25, 10_000, Breaker(3, 5.0), processes=processes) for _ in range(processes)]
    held: list[list[Lease]] = [[] for _ in routers]
    for r in routers:
        r.set_members({n: Member(1.0, "r1") for n in nodes})
    for p, key, rows in steps:
        r, mine = routers[p % processes], held[p % processes]
        while mine and (key % 5 == 0 or sum(lease.rows for lease in mine) + rows > per_process):
            r.release(mine.pop(0), ok=True)
            key += 1
        mine.append(r.acquire(f"k{key % 7 if key % 2 else key}", rows=rows, floor_rows=batch))
        total: Counter[str] = Counter()
        for o in routers:
            total.update(o.rows_in_flight())
        assert max(total.values()) <= batch


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
