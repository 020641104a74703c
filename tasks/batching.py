"""The batching policy, kept pure so that it can be tested with a fake clock.

Requests are grouped by key (model, version). A group is closed into a batch when

* its rows reach ``max_batch_size`` (it never waits when a full batch is already there);
* its oldest request has waited ``max_delay_ms``; or
* no request has joined it for ``idle_ms``: nothing more is on its way, so waiting longer
  would only add latency. Under load requests keep arriving and batches fill up; at low load
  a lone request is served at once instead of sitting out the whole ``max_delay_ms``.

A batch never holds more than ``max_batch_size`` rows; requests stay in arrival order.
The caller supplies ``now`` (seconds, monotonic) and decides when to call :meth:`due`
(:meth:`next_wakeup` tells it when).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # rows
    max_delay_ms: float
    idle_ms: float

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_delay_ms < 0 or self.idle_ms < 0:
            raise ValueError("delays must not be negative")


@dataclass
class Batch(Generic[T]):
    key: Hashable
    items: list[T]
    rows: int


@dataclass
class _Group(Generic[T]):
    policy: BatchPolicy
    items: list[tuple[T, int]] = field(default_factory=list)
    rows: int = 0
    oldest: float = 0.0
    newest: float = 0.0

    def deadline(self) -> float:
        return min(self.oldest + self.policy.max_delay_ms / 1000, self.newest + self.policy.idle_ms / 1000)


class Collector(Generic[T]):
    """Collects items into per-key batches according to each key's :class:`BatchPolicy`."""

    def __init__(self, policy_for: Callable[[Hashable], BatchPolicy]) -> None:
        self._policy_for = policy_for
        self._groups: dict[Hashable, _Group[T]] = {}

    def __len__(self) -> int:
        """Items waiting, over all groups."""
        return sum(len(g.items) for g in self._groups.values())

    def add(self, key: Hashable, item: T, rows: int, now: float) -> list[Batch[T]]:
        """Add ``item`` of ``rows`` rows; return the batches that are now full.

        An item larger than ``max_batch_size`` raises ValueError: the gateway rejects those.
        """
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(self._policy_for(key))
        limit = group.policy.max_batch_size
        if rows < 1 or rows > limit:
            raise ValueError(f"an item of {rows} rows does not fit a batch of at most {limit}")
        full: list[Batch[T]] = []
        if group.rows + rows > limit:
            full.append(self._close(key))
            group = self._groups[key] = _Group(group.policy)
        if not group.items:
            group.oldest = now
        group.items.append((item, rows))
        group.rows += rows
        group.newest = now
        if group.rows == limit:
            full.append(self._close(key))
        return full

    def due(self, now: float) -> list[Batch[T]]:
        """Batches whose wait is over at ``now``."""
        return [self._close(key) for key, g in list(self._groups.items()) if g.deadline() <= now]

    def drain(self) -> list[Batch[T]]:
        """Everything still waiting (on shutdown)."""
        return [self._close(key) for key in list(self._groups)]

    def next_wakeup(self) -> float | None:
        """When the earliest waiting group becomes due, or None when nothing waits."""
        return min((g.deadline() for g in self._groups.values()), default=None)

    def _close(self, key: Hashable) -> Batch[T]:
        group = self._groups.pop(key)
        return Batch(key, [item for item, _ in group.items], group.rows)
