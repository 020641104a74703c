"""The circuit breaker, without Redis or sleeping: what counts as a fault, and the one half-open probe."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis import Redis

from app.breaker import Breaker
from app.routing import Lease, Router
from app.submit import Dispatcher
from hashing.membership import Member
from tasks.contract import ErrorKind, Failure, Reply, Result, Tensor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock, threshold: int = 3) -> Breaker:
    """A breaker with ``w1`` just opened."""
    b = Breaker(threshold, 5.0, clock)
    for _ in range(threshold):
        b.record("w1", ok=False)
    return b


# --- the breaker alone ---------------------------------------------------------------------------


def test_opens_after_threshold_consecutive_failures() -> None:
    clock = Clock()
    b = Breaker(3, 5.0, clock)
    b.record("w1", ok=False)
    b.record("w1", ok=False)
    b.record("w1", ok=True)  # a success resets the count
    b.record("w1", ok=False)
    b.record("w1", ok=False)
    assert b.blocked() == frozenset() and b.open_nodes() == []
    b.record("w1", ok=False)
    assert b.blocked() == {"w1"} and b.open_nodes() == ["w1"]


def test_cooling_down_admits_no_probe() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now = 4.999
    assert b.try_probe("w1") is None
    assert b.blocked() == {"w1"}


def test_half_open_admits_exactly_one_probe() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now = 5.0
    assert b.blocked() == frozenset()  # half-open: back in the ring for its probe
    ticket = b.try_probe("w1")
    assert ticket is not None
    assert b.blocked() == {"w1"}  # the probe is in flight: out for everyone else
    clock.now = 100.0
    assert b.try_probe("w1") is None
    assert b.blocked() == {"w1"}
    assert b.open_nodes() == ["w1"]


def test_probe_success_closes() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now = 5.0
    b.end_probe("w1", b.try_probe("w1") or 0, ok=True)
    assert b.blocked() == frozenset() and b.open_nodes() == []
    b.record("w1", ok=False)  # counting starts afresh
    b.record("w1", ok=False)
    assert b.open_nodes() == []


def test_probe_failure_reopens_for_a_new_cooldown() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now = 5.0
    ticket = b.try_probe("w1")
    clock.now = 7.0
    b.end_probe("w1", ticket or 0, ok=False)
    clock.now = 11.999
    assert b.blocked() == {"w1"} and b.try_probe("w1") is None
    clock.now = 12.0
    assert b.blocked() == frozenset() and b.try_probe("w1") is not None


def test_probe_without_verdict_frees_the_slot() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now = 5.0
    first = b.try_probe("w1")
    b.end_probe("w1", first or 0, ok=None)
    assert b.blocked() == frozenset() and b.open_nodes() == ["w1"]  # still half-open
    second = b.try_probe("w1")
    assert second is not None and second != first
    b.end_probe("w1", first or 0, ok=True)  # a stale ticket decides nothing
    assert b.blocked() == {"w1"}
    b.end_probe("w1", second, ok=True)
    assert b.open_nodes() == []


def test_only_the_probe_decides() -> None:
    """Verdicts of requests sent before the breaker opened (or sent anyway) are ignored."""
    clock = Clock()
    b = opened(clock)
    b.record("w1", ok=True)
    assert b.blocked() == {"w1"}
    clock.now = 5.0
    ticket = b.try_probe("w1")
    b.record("w1", ok=True)
    b.record("w1", ok=False)
    assert b.blocked() == {"w1"}
    b.end_probe("w1", ticket or 0, ok=True)
    assert b.open_nodes() == []


def test_forget_starts_afresh_and_voids_the_probe() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now = 5.0
    ticket = b.try_probe("w1")
    b.forget("w1")
    assert b.blocked() == frozenset() and b.open_nodes() == []
    for _ in range(3):
        b.record("w1", ok=False)
    b.end_probe("w1", ticket or 0, ok=True)  # the old run's probe cannot close the new breaker
    assert b.open_nodes() == ["w1"]


def test_nodes_are_independent() -> None:
    clock = Clock()
    b = opened(clock)
    b.record("w2", ok=False)
    assert b.blocked() == {"w1"} and b.open_nodes() == ["w1"]


def test_bad_threshold() -> None:
    with pytest.raises(ValueError):
        Breaker(0, 1.0)


# --- what the dispatcher tells the breaker ---------------------------------------------------------


ROW = [Tensor("pixels", "FP32", (1, 64), bytes(256))]


def dispatcher(threshold: int = 1) -> Dispatcher:
    """A dispatcher whose sender never runs: calls are routed and wait for :meth:`resolve`."""
    router = Router(150, 0, 100, Breaker(threshold, 5.0, Clock()))
    router.set_members({"w1": Member(1.0, "r1")})
    return Dispatcher(Redis(), router, queue_grace_s=60)


def answer(d: Dispatcher, reply: Callable[[str], Reply]) -> None:
    """Route one call and resolve it with ``reply(call_id)``."""
    call = d.submit("k", "digits", "1", ROW, 0.0, 32)
    d.resolve(reply(call.id))


def fails(kind: ErrorKind) -> Callable[[str], Reply]:
    return lambda call_id: Failure(call_id, "w1", kind, kind.wire)


def succeeds(call_id: str) -> Reply:
    return Result(call_id, "w1", 1, "1", ())


@pytest.mark.parametrize(
    ("reply", "fault"),
    [
        (fails(ErrorKind.INFERENCE_FAILED), True),  # the worker's 500
        (succeeds, False),
        (fails(ErrorKind.BAD_INPUT), False),  # a 4xx shows the worker working
        (fails(ErrorKind.UNKNOWN_MODEL), False),
        (fails(ErrorKind.EXPIRED), False),  # the worker's 504: it skipped an expired request
    ],
)
def test_only_a_workers_500_is_a_fault(reply: Callable[[str], Reply], fault: bool) -> None:
    d = dispatcher()
    answer(d, reply)
    assert d.router.open_breakers() == (["w1"] if fault else [])
    assert d.router.in_flight() == {}


def test_a_success_resets_the_count_and_an_expired_request_is_neutral() -> None:
    d = dispatcher(threshold=2)
    answer(d, fails(ErrorKind.INFERENCE_FAILED))
    answer(d, fails(ErrorKind.BAD_INPUT))  # resets
    answer(d, fails(ErrorKind.INFERENCE_FAILED))
    answer(d, fails(ErrorKind.EXPIRED))  # neither resets nor counts
    assert d.router.open_breakers() == []
    answer(d, fails(ErrorKind.INFERENCE_FAILED))
    assert d.router.open_breakers() == ["w1"]


def test_the_gateways_own_errors_are_no_fault() -> None:
    d = dispatcher()
    call = d.submit("k", "digits", "1", ROW, 0.0, 32)
    d.set_members({})  # its worker left and no other can take it: the gateway answers 503
    assert call.wait(0) and call.error is not None and call.error.status == 503
    assert d.router.open_breakers() == [] and d.router.in_flight() == {}


@pytest.mark.parametrize(("worker_fault", "opens"), [(False, []), (True, ["w1"])])
def test_only_the_servers_own_timeout_is_a_fault(worker_fault: bool, opens: list[str]) -> None:
    d = dispatcher()
    call = d.submit("k", "digits", "1", ROW, 0.0, 32)
    d.forget(call, worker_fault=worker_fault)
    assert d.router.open_breakers() == opens
    assert d.router.in_flight() == {}
    d.resolve(fails(ErrorKind.INFERENCE_FAILED)(call.id))  # a late answer nobody waits for: dropped
    assert d.router.open_breakers() == opens


def test_a_probe_ended_by_the_clients_deadline_frees_the_slot() -> None:
    clock = Clock()
    router = Router(150, 0, 100, Breaker(1, 5.0, clock))
    router.set_members({"w1": Member(1.0, "r1"), "w2": Member(1.0, "r1")})
    d = Dispatcher(Redis(), router, queue_grace_s=60)
    key = next(k for k in (f"k{i}" for i in range(1000)) if router.acquire(k).node == "w1")
    router.release(Lease("w1", 1), ok=False)  # w1 opens (threshold 1)
    clock.now = 5.0
    probe = d.submit(key, "digits", "1", ROW, 0.0, 32)
    assert probe.node == "w1" and probe.lease is not None and probe.lease.probe is not None
    assert d.submit(key, "digits", "1", ROW, 0.0, 32).node == "w2"  # the probe is in flight
    d.forget(probe, worker_fault=False)
    probe = d.submit(key, "digits", "1", ROW, 0.0, 32)
    assert probe.node == "w1"  # the next request probes
    d.resolve(succeeds(probe.id))
    assert router.open_breakers() == []
