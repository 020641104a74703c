"""Which workers hold which rows of a sharded table: the ring's answer for integer row ids.

A sharded table's row ``i`` lives on the ring at :func:`hash_id` ``(i)``; its holders are the
first ``replicas`` distinct nodes clockwise from there (:meth:`Ring.preference_hash`). The
gateway asks that per row of a request; a worker asks it for millions of rows at once when
membership changes, so the same hash exists twice: :func:`hash_id` in pure Python and
:func:`hash_ids` in numpy, equal bit for bit (a property test holds them to it).

The hash is splitmix64's finaliser rather than the ring's blake2b: a bijective 64-bit mix
that numpy computes for 4,000,000 ids in tens of milliseconds, where blake2b would need a
Python call per id. Keys and points still meet on the same 64-bit circle.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hashing.ring import Ring

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
CHUNK_IDS = 1 << 20  # ids hashed at a time: bounds the temporary arrays to a few MB


def hash_id(row: int) -> int:
    """The ring position of table row ``row`` (splitmix64 of the id, as an unsigned 64-bit int)."""
    x = (row + _GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & MASK64
    return x ^ (x >> 31)


def hash_ids(rows: np.ndarray) -> np.ndarray:
    """:func:`hash_id` of every id in ``rows`` (uint64; arithmetic wraps modulo 2**64 as intended)."""
    x = rows.astype(np.uint64) + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MUL1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MUL2)
    return x ^ (x >> np.uint64(31))


def holders(ring: Ring, row: int, replicas: int) -> list[str]:
    """The nodes that hold row ``row``: its owner first, then the next distinct nodes clockwise."""
    return ring.preference_hash(hash_id(row), replicas)


def held_rows(ring: Ring, node: str, replicas: int, rows: int) -> np.ndarray:
    """The ids in ``[0, rows)`` that ``node`` holds (sorted int64), computed in chunks of ids.

    Each point of the ring starts an arc; whether ``node`` is among that arc's first
    ``replicas`` distinct nodes is worked out once per point (a few hundred), then every id
    looks up its arc with one vectorised ``searchsorted``.
    """
    points, _ = ring.arcs()
    if node not in ring:
        return np.empty(0, dtype=np.int64)
    mine = np.array([node in ring.preference_hash(p, replicas) for p in points], dtype=bool)
    sorted_points = np.array(points, dtype=np.uint64)
    parts = []
    for start in range(0, rows, CHUNK_IDS):
        ids = np.arange(start, min(rows, start + CHUNK_IDS), dtype=np.int64)
        arc = np.searchsorted(sorted_points, hash_ids(ids), side="left") % len(points)
        parts.append(ids[mine[arc]])
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def ring_digest(nodes: dict[str, float]) -> str:
    """A short name for a membership (node -> weight): equal views of the ring give equal digests."""
    text = ",".join(f"{n}={float(w)!r}" for n, w in sorted(nodes.items()))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
