"""A circuit breaker per worker: stop sending to a worker that keeps failing, try it again later.

A worker that is alive (it still heartbeats) but fails or times out ``threshold`` times in a
row is *open*: the router leaves it out for ``cooldown_s``. Then it is *half-open*: traffic
resumes, the first success closes the breaker, the first failure opens it again at once.
Pure logic with an injectable clock, so it is tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self._threshold = threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._opened_at: dict[str, float] = {}

    def record(self, node: str, ok: bool) -> None:
        """The outcome of one request sent to ``node``."""
        if ok:
            self._failures.pop(node, None)
            self._opened_at.pop(node, None)
            return
        failures = self._failures[node] = self._failures.get(node, 0) + 1
        if failures >= self._threshold:
            self._opened_at[node] = self._clock()

    def blocked(self) -> frozenset[str]:
        """Nodes whose breaker is open now (not yet half-open)."""
        now = self._clock()
        return frozenset(n for n, t in self._opened_at.items() if now - t < self._cooldown_s)

    def forget(self, node: str) -> None:
        """``node`` left the ring: a worker that comes back under its name starts afresh."""
        self._failures.pop(node, None)
        self._opened_at.pop(node, None)
