"""Consistent-hash ring: which worker owns a routing key.

Every gateway process, on every machine, must route a key to the same worker given the same
membership, and a join or leave must move only the keys whose owner changed (about 1/(N+1) of
them on a join). A ring of virtual points does both: each node contributes ``round(vnodes *
weight)`` points hashed with a stable 64-bit hash (blake2b, never Python's salted ``hash()``),
a key belongs to the first point clockwise at or after its own hash, and adding or removing a
node only inserts or deletes that node's points. The ring is a plain data structure — sorted
points plus ``bisect`` — with no I/O; membership (who is in the ring) lives elsewhere.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

HashFn = Callable[[bytes | str], int]

DEFAULT_VNODES = 150
DEFAULT_LOAD_FACTOR = 1.25


class EmptyRingError(LookupError):
    """A lookup was made on a ring that has no nodes."""


def hash64(data: bytes | str) -> int:
    """Stable unsigned 64-bit hash: blake2b with an 8-byte digest, read big-endian.

    A ``str`` is hashed as its UTF-8 bytes, so ``hash64("k") == hash64(b"k")``.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class Ring:
    """Consistent-hash ring with virtual nodes and weights.

    Invariant: ``_ring`` holds every virtual point as ``(point, node_id)`` sorted ascending, and
    ``_points`` is its first column (what ``bisect`` searches). Points that collide are ordered
    by ``node_id``, so the owner of a contested point does not depend on insertion order.
    """

    def __init__(self, vnodes: int = DEFAULT_VNODES, hash_fn: HashFn = hash64) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self._vnodes = vnodes
        self._hash = hash_fn
        self._weights: dict[str, float] = {}
        self._ring: list[tuple[int, str]] = []
        self._points: list[int] = []

    @property
    def vnodes(self) -> int:
        """Virtual points per node of weight 1.0."""
        return self._vnodes

    @property
    def nodes(self) -> dict[str, float]:
        """A copy of the membership: node_id -> weight."""
        return dict(self._weights)

    def __len__(self) -> int:
        """Number of (physical) nodes, not virtual points."""
        return len(self._weights)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._weights

    @classmethod
    def from_nodes(cls, nodes: Mapping[str, float], vnodes: int = DEFAULT_VNODES, hash_fn: HashFn = hash64) -> Ring:
        """A ring of ``nodes`` (node_id -> weight), its points sorted once: O(P log P) for P points.

        The same ring as adding the nodes one by one, in any order (colliding points included).
        Raises ``ValueError`` when a weight is not a finite number > 0.
        """
        ring = cls(vnodes, hash_fn)
        entries: list[tuple[int, str]] = []
        for node_id, weight in nodes.items():
            entries += ring._entries(node_id, weight)
        entries.sort()
        ring._weights = dict(nodes)
        ring._ring = entries
        ring._points = [point for point, _ in entries]
        return ring

    def add(self, node_id: str, weight: float = 1.0) -> None:
        """Add ``node_id`` with ``max(1, round(vnodes * weight))`` points.

        Re-adding an existing node replaces its weight (and its points). Raises ``ValueError``
        when ``weight`` is not a finite number > 0. The node's points are sorted, then merged
        with the ring's (Timsort merges two sorted runs in linear time): no per-point insert.
        """
        entries = sorted(self._entries(node_id, weight))
        if node_id in self._weights:
            self.remove(node_id)
        self._weights[node_id] = weight
        self._ring = sorted(self._ring + entries)
        self._points = [point for point, _ in self._ring]

    def remove(self, node_id: str) -> None:
        """Remove ``node_id`` and its points; raises ``KeyError`` if it is not in the ring."""
        if node_id not in self._weights:
            raise KeyError(node_id)
        del self._weights[node_id]
        self._ring = [entry for entry in self._ring if entry[1] != node_id]
        self._points = [point for point, _ in self._ring]

    def lookup(self, key: bytes | str) -> str:
        """The owner of ``key``: the node of the first point at or after ``hash(key)``, wrapping."""
        return self._ring[self._start(key)][1]

    def lookup_hash(self, position: int) -> str:
        """The owner of a key whose hash is ``position`` (keys hashed elsewhere, e.g. table row ids)."""
        return self._ring[self._index(position)][1]

    def preference_hash(self, position: int, n: int) -> list[str]:
        """:meth:`preference_list` of a key whose hash is ``position``."""
        return self._first_distinct(self._index(position), n)

    def arcs(self) -> tuple[list[int], list[str]]:
        """Every point, ascending, and the node each belongs to: for owning many keys at once."""
        return list(self._points), [node_id for _, node_id in self._ring]

    def preference_list(self, key: bytes | str, n: int) -> list[str]:
        """The owner of ``key`` then the next distinct nodes clockwise: ``min(n, len(self))`` ids.

        Used for replicas and fail-over; ``n <= 0`` gives an empty list.
        """
        return self._first_distinct(self._start(key), n)

    def _first_distinct(self, start: int, n: int) -> list[str]:
        chosen: list[str] = []
        if n <= 0:
            return chosen
        for node_id in self._successors_from(start):
            chosen.append(node_id)
            if len(chosen) == n:
                break
        return chosen

    def position(self, key: bytes | str) -> int:
        """Where ``key`` sits on the ring: hash it once, look it up with the ``*_hash`` methods."""
        return self._hash(key)

    def lookup_bounded(
        self,
        key: bytes | str,
        loads: Mapping[str, int],
        c: float = DEFAULT_LOAD_FACTOR,
        floor: float = 0,
        size: int = 1,
    ) -> str:
        """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018), weighted.

        Walks the preference order of ``key`` and returns the first node whose load plus
        ``size`` fits its capacity ``max(floor, ceil(c * (total + size) * weight / total_weight))``,
        where ``total`` sums ``loads`` over the ring's nodes (missing nodes count 0; nodes
        outside the ring are ignored). So no node is ever pushed above ``floor`` or ``c`` times
        its weighted share of the load, and below ``floor`` a key always meets its owner: a
        light load never moves a key. With ``size == 1`` some node always fits (the least
        loaded relative to its weight); a larger item that fits nowhere goes to its owner.
        Raises ``ValueError`` when ``c < 1``, ``size < 1`` or a load is negative.
        """
        return self.lookup_bounded_hash(self._hash(key), loads, c, floor, size)

    def lookup_bounded_hash(
        self,
        position: int,
        loads: Mapping[str, int],
        c: float = DEFAULT_LOAD_FACTOR,
        floor: float = 0,
        size: int = 1,
    ) -> str:
        """:meth:`lookup_bounded` of a key whose hash is ``position``."""
        if not c >= 1.0:
            raise ValueError(f"c must be >= 1, got {c!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not self._weights:
            raise EmptyRingError("cannot look up a key in an empty ring")
        total = 0
        for node_id in self._weights:
            load = loads.get(node_id, 0)
            if load < 0:
                raise ValueError(f"load of {node_id!r} is negative: {load}")
            total += load
        start = self._index(position)
        owner = self._ring[start][1]
        if loads.get(owner, 0) + size <= floor:  # below the floor a key meets its owner: no walk
            return owner
        share = c * (total + size) / sum(self._weights.values())
        for node_id in self._successors_from(start):
            capacity = max(floor, math.ceil(share * self._weights[node_id]))
            if loads.get(node_id, 0) + size <= capacity:
                return node_id
        return owner

    def _entries(self, node_id: str, weight: float) -> list[tuple[int, str]]:
        """The ``(point, node_id)`` entries of ``node_id`` at ``weight``, unsorted."""
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        return [(self._hash(f"{node_id}#{i}"), node_id) for i in range(max(1, round(self._vnodes * weight)))]

    def _start(self, key: bytes | str) -> int:
        """Index in ``_ring`` of the first point at or after ``hash(key)``, wrapping to 0."""
        return self._index(self._hash(key))

    def _index(self, position: int) -> int:
        """Index in ``_ring`` of the first point at or after ``position``, wrapping to 0."""
        if not self._ring:
            raise EmptyRingError("cannot look up a key in an empty ring")
        index = bisect_left(self._points, position)
        return 0 if index == len(self._points) else index

    def _successors_from(self, start: int) -> Iterator[str]:
        """Distinct nodes clockwise from the point at index ``start``; every node exactly once."""
        seen: set[str] = set()
        size = len(self._ring)
        for offset in range(size):
            node_id = self._ring[(start + offset) % size][1]
            if node_id not in seen:
                seen.add(node_id)
                yield node_id
                if len(seen) == len(self._weights):
                    return
