"""Choose the worker for each request: the ring, bounded loads for hot keys, circuit breakers.

The router counts this gateway process's requests in flight per worker. A key goes to its
owner on the ring unless the owner already carries more than ``load_factor`` × the mean
in-flight load; then it spills to the next node on the ring ("Consistent Hashing with Bounded
Loads"). Each gateway process bounds its own share of the load: processes do not exchange
counts, so the bound holds per process, and the sum over G processes stays within
``load_factor`` × mean + G. A worker with more than ``max_in_flight`` of our requests is full
(the caller answers 429). Workers whose breaker is open are left out while any other remains.
"""

from __future__ import annotations

import threading
from collections import Counter

from app.breaker import Breaker
from hashing.membership import Member
from hashing.ring import EmptyRingError, Ring


class WorkerFull(Exception):
    """The chosen worker already has ``max_in_flight`` requests of this process."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


class Router:
    def __init__(self, vnodes: int, load_factor: float, max_in_flight: int, breaker: Breaker) -> None:
        self._vnodes = vnodes
        self._load_factor = load_factor  # < 1: bounded loads off, plain ring lookup
        self._max_in_flight = max_in_flight
        self._breaker = breaker
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._blocked: frozenset[str] = frozenset()
        self._ring = Ring(vnodes)
        self._in_flight: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._members)

    @property
    def members(self) -> dict[str, Member]:
        return dict(self._members)

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return {n: c for n, c in self._in_flight.items() if c}

    def set_members(self, members: dict[str, Member]) -> set[str]:
        """Follow membership; returns the nodes that left or restarted (their work is lost)."""
        with self._lock:
            gone = {n for n, m in self._members.items() if members.get(n) != m}
            for node in gone:
                self._breaker.forget(node)
            self._members = dict(members)
            self._rebuild(self._breaker.blocked())
            return gone

    def acquire(self, key: str) -> str:
        """The node for ``key``, counted in flight until :meth:`release`."""
        with self._lock:
            blocked = self._breaker.blocked()
            if blocked != self._blocked:
                self._rebuild(blocked)
            if self._load_factor >= 1:
                node = self._ring.lookup_bounded(key, self._in_flight, self._load_factor)
            else:
                node = self._ring.lookup(key)
            if self._in_flight[node] >= self._max_in_flight:
                raise WorkerFull(node)
            self._in_flight[node] += 1
            return node

    def release(self, node: str, ok: bool | None) -> None:
        """A request sent to ``node`` is over; ``ok`` is its verdict (None: not the worker's doing)."""
        with self._lock:
            if self._in_flight[node] > 0:
                self._in_flight[node] -= 1
            if ok is not None:
                self._breaker.record(node, ok)

    def _rebuild(self, blocked: frozenset[str]) -> None:
        usable = {n: m for n, m in self._members.items() if n not in blocked} or self._members
        ring = Ring(self._vnodes)
        for node, member in usable.items():
            ring.add(node, member.weight)
        self._ring = ring
        self._blocked = blocked


__all__ = ["EmptyRingError", "Router", "WorkerFull"]
