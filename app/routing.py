"""Choose the worker for each request: the ring, bounded loads for hot keys, circuit breakers.

A key goes to its owner on the ring unless bounded loads ("Consistent Hashing with Bounded
Loads", weighted) spill it to the next node. The router counts this gateway process's rows in
flight per worker; a worker is *full* only above both its share of one batch of the request's
model (``floor_rows``: while a worker's rows fit in a batch, more requests cost it nothing but
a fuller batch, so a key always meets its owner under light load) and ``load_factor`` × its
weight-proportional share of the rows in flight. Each gateway process bounds only its own rows:
to an equal part of the batch among the gateway processes (those started beside it on this host,
``RINGSERVE_GATEWAY_PROCESSES``, or more if more report rows in flight, counted every 100 ms),
and to ``load_factor`` × the worker's share of its own rows. Summed over the processes, a worker
then holds at most one batch while every process is below its part of it, and at most
``load_factor`` × its share of everybody's rows while every process is above it, whatever the
processes' rows do between reports. (Weighing the others' last reported rows per worker instead
would act on counts up to 100 ms stale exactly where bounded loads matter; exchanging them per
request would cost a Redis round trip each.) A worker with
more than ``max_in_flight`` of our requests is full (the caller answers 429). Workers whose breaker is
open, or whose one half-open probe is in flight (:mod:`app.breaker`), and workers that missed
their heartbeats (*silent*) are left out while any other remains.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from app.breaker import Breaker
from hashing.membership import Member
from hashing.ring import EmptyRingError, Ring

QUIET_S = 0.5  # a silent worker that has not answered for this long is routed around


class WorkerFull(Exception):
    """The chosen worker already has ``max_in_flight`` requests of this process."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


@dataclass(frozen=True)
class Lease:
    """What :meth:`Router.acquire` hands out for one request, to give back to :meth:`Router.release`.

    ``spilled``: bounded loads sent it past its key's owner. ``probe``: it is the one probe of
    a half-open breaker (the breaker's ticket), so its verdict must travel with it.
    """

    node: str
    rows: int
    spilled: bool = False
    probe: int | None = None


class Router:
    def __init__(
        self,
        vnodes: int,
        load_factor: float,
        max_in_flight: int,
        breaker: Breaker,
        clock: Callable[[], float] = time.monotonic,
        processes: int = 1,
    ) -> None:
        self._clock = clock
        self._processes = max(1, processes)  # gateway processes started together: they share the batch floor
        self._vnodes = vnodes
        self._load_factor = load_factor  # < 1: bounded loads off, plain ring lookup
        self._max_in_flight = max_in_flight
        self._breaker = breaker
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._excluded: frozenset[str] = frozenset()  # left out of the ring built last
        self._silent: frozenset[str] = frozenset()  # missed their heartbeats
        self._answered_at: dict[str, float] = {}  # when each worker last answered a request
        self._quiet_taken: frozenset[str] = frozenset()  # quiet nodes already handed to take_quiet
        self._ring = Ring(vnodes)
        self._in_flight: Counter[str] = Counter()  # requests, for max_in_flight
        self._rows: Counter[str] = Counter()  # their rows, for bounded loads
        self._peers = 0  # other gateway processes with rows in flight, as last counted

    def __len__(self) -> int:
        return len(self._members)

    @property
    def members(self) -> dict[str, Member]:
        return dict(self._members)

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per node (this process)."""
        with self._lock:
            return {n: c for n, c in self._in_flight.items() if c}

    def set_peers(self, count: int) -> None:
        """How many other gateway processes have rows in flight (more than were started beside this
        one: gateways on other hosts): each keeps a worker within an equal part of one batch, so
        that together they keep it within one. Counted every 100 ms while this process has rows in
        flight; the last count holds in between."""
        with self._lock:
            self._peers = max(0, count)

    @property
    def peers(self) -> int:
        """Other gateway processes with rows in flight, as last counted (see :meth:`set_peers`)."""
        with self._lock:
            return self._peers

    def rows_in_flight(self) -> dict[str, int]:
        """Their rows per node: what bounded loads weigh."""
        with self._lock:
            return {n: c for n, c in self._rows.items() if c}

    def set_members(self, members: dict[str, Member]) -> set[str]:
        """Follow membership; returns the nodes that left or restarted (their work is lost)."""
        with self._lock:
            gone = {n for n, m in self._members.items() if members.get(n) != m}
            for node in gone:
                self._breaker.forget(node)
            self._members = dict(members)
            self._rebuild(self._left_out(self._clock()))
            return gone

    def set_silent(self, nodes: set[str]) -> None:
        """Members that missed their heartbeats.

        One that has not answered us for :data:`QUIET_S` either is dead or frozen: it leaves the
        ring until it beats or answers again (:meth:`take_quiet` tells when it does). A silent
        member that still answers is only slow to beat (a loaded machine), and keeps its keys.
        """
        with self._lock:
            self._silent = frozenset(nodes)
            self._rebuild(self._left_out(self._clock()))

    def take_quiet(self) -> set[str]:
        """Silent members left out since the last call: what they hold will not be answered soon."""
        with self._lock:
            now = self._clock()
            quiet = frozenset(self._quiet(now))
            newly, self._quiet_taken = quiet - self._quiet_taken, quiet
            return set(newly)

    def open_breakers(self) -> list[str]:
        """Workers whose breaker is not closed (open, half-open or probing), sorted."""
        with self._lock:
            return self._breaker.open_nodes()

    def placements(self, positions: list[int]) -> list[tuple[str, ...]]:
        """The first two nodes clockwise from each ring position, on the ring requests are routed by."""
        with self._lock:
            self._follow_exclusions()
            return [tuple(self._ring.preference_hash(p, 2)) for p in positions]

    def acquire(self, key: str, rows: int = 1, floor_rows: int = 0, position: int | None = None) -> Lease:
        """The node for a request of ``rows`` rows under ``key``, counted until :meth:`release`.

        Bounded loads count this process's rows in flight and engage only above its part of
        ``floor_rows`` per worker (one batch of the request's model): while a worker's rows fit
        in a batch, a key meets its owner. A request given a ring ``position`` (rows of a
        sharded table) goes to its owner: only the holders of those rows have them. If the node's
        breaker is half-open, this request becomes its probe and the node leaves the ring until
        the probe is released.
        """
        with self._lock:
            self._follow_exclusions()
            at = self._ring.position(key) if position is None else position  # the key is hashed once
            owner = node = self._ring.lookup_hash(at)
            if self._load_factor >= 1 and position is None:
                floor = floor_rows / max(self._processes, 1 + self._peers)
                node = self._ring.lookup_bounded_hash(at, self._rows, self._load_factor, floor, rows)
            if self._in_flight[node] >= self._max_in_flight:
                raise WorkerFull(node)
            probe = self._breaker.try_probe(node)
            if probe is not None:
                self._follow_exclusions()
            self._in_flight[node] += 1
            self._rows[node] += rows
            return Lease(node, rows, node != owner, probe)

    def release(self, lease: Lease, ok: bool | None) -> None:
        """The request of ``lease`` is over.

        ``ok`` is its verdict: False only for the worker's own fault, None when it says nothing
        about the worker (the client's deadline, the worker left, the queue is down).
        """
        node = lease.node
        with self._lock:
            if self._in_flight[node] > 0:
                self._in_flight[node] -= 1
                self._rows[node] = max(0, self._rows[node] - lease.rows)
            if ok is not None:  # the worker answered
                self._answered_at[node] = self._clock()
            if lease.probe is not None:
                self._breaker.end_probe(node, lease.probe, ok)
            elif ok is not None:
                self._breaker.record(node, ok)

    def _quiet(self, now: float) -> set[str]:
        return {n for n in self._silent if now - self._answered_at.get(n, -math.inf) > QUIET_S}

    def _left_out(self, now: float) -> frozenset[str]:
        """Nodes to route around: open breakers (or probing), and silent nodes that stopped answering."""
        return self._breaker.blocked() | self._quiet(now)

    def _follow_exclusions(self) -> None:
        left_out = self._left_out(self._clock())
        if left_out != self._excluded:
            self._rebuild(left_out)

    def _rebuild(self, left_out: frozenset[str]) -> None:
        usable = {n: m for n, m in self._members.items() if n not in left_out} or self._members
        self._ring = Ring.from_nodes({n: m.weight for n, m in usable.items()}, self._vnodes)
        self._excluded = left_out


__all__ = ["EmptyRingError", "Lease", "Router", "WorkerFull"]
