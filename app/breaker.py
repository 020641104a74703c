"""A circuit breaker per worker: stop sending to a worker that keeps failing, try it again later.

Only the worker's own faults count (the caller decides what a fault is: see
:meth:`app.submit.Dispatcher.resolve`). A worker that is alive (it still heartbeats) but fails
``threshold`` times in a row is *open*: the router leaves it out for ``cooldown_s``. Then it is
*half-open*: back in the ring, and the first request routed to it becomes its one *probe*
(:meth:`Breaker.try_probe`). While the probe is in flight the worker is out of the ring again,
so a sick worker never takes more than one request per cooldown. The probe's verdict decides
(:meth:`Breaker.end_probe`): a success closes the breaker, a failure opens it for a new cooldown,
no verdict (the client gave up first) frees the probe slot so the next request probes.

Verdicts of other requests to a worker whose breaker is not closed are ignored: they were sent
before it opened, or sent anyway because every worker was out. Only the probe decides.

Pure logic with an injectable clock, so it is tested without waiting; not thread-safe (the
router calls it under its lock).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable


class Breaker:
    def __init__(self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self._threshold = threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failures: dict[str, int] = {}  # consecutive failures of closed breakers
        self._opened_at: dict[str, float] = {}  # every breaker not closed: open, half-open or probing
        self._probes: dict[str, int] = {}  # node -> ticket of its probe in flight
        self._tickets = itertools.count(1)

    def record(self, node: str, ok: bool) -> None:
        """The verdict of one request sent to ``node`` that was not a probe."""
        if node in self._opened_at:
            return  # not closed: only the probe decides
        if ok:
            self._failures.pop(node, None)
            return
        failures = self._failures[node] = self._failures.get(node, 0) + 1
        if failures >= self._threshold:
            self._opened_at[node] = self._clock()

    def blocked(self) -> frozenset[str]:
        """Nodes to leave out of the ring now: open (cooling down) or with a probe in flight."""
        now = self._clock()
        return frozenset(n for n, t in self._opened_at.items() if now - t < self._cooldown_s or n in self._probes)

    def try_probe(self, node: str) -> int | None:
        """A request is about to go to ``node``: if its breaker is half-open, make it the probe.

        Returns the probe's ticket (hand it to :meth:`end_probe`), or None when the request is
        not a probe (the breaker is closed, still cooling down, or already probing).
        """
        opened_at = self._opened_at.get(node)
        if opened_at is None or node in self._probes or self._clock() - opened_at < self._cooldown_s:
            return None
        ticket = self._probes[node] = next(self._tickets)
        return ticket

    def end_probe(self, node: str, ticket: int, ok: bool | None) -> None:
        """The probe ``ticket`` of ``node`` is over; ``ok`` is its verdict (None: none).

        A ticket that is no longer current (the node was forgotten meanwhile) changes nothing.
        """
        if self._probes.get(node) != ticket:
            return
        del self._probes[node]
        if ok is None:
            return  # still half-open: the next request probes
        if ok:
            self._opened_at.pop(node, None)
            self._failures.pop(node, None)
        else:
            self._opened_at[node] = self._clock()

    def open_nodes(self) -> list[str]:
        """Nodes whose breaker is not closed (open, half-open or probing), sorted."""
        return sorted(self._opened_at)

    def forget(self, node: str) -> None:
        """``node`` left the ring: a worker that comes back under its name starts afresh."""
        self._failures.pop(node, None)
        self._opened_at.pop(node, None)
        self._probes.pop(node, None)
