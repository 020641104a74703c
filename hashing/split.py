"""Which version of a model a routing key gets under a traffic split: weighted rendezvous hashing.

Each version ``v`` with weight ``w_v > 0`` scores a key ``-ln(u_v(key)) / w_v``, where
``u_v(key)`` is a stable 64-bit hash of (key, version) mapped into the open interval (0, 1);
the lowest score wins. ``-ln(u)`` is an exponential variable of rate 1, so ``score_v`` is
exponential of rate ``w_v`` and version ``v`` wins with probability ``w_v / sum(w)``: the
shares follow the weights, which need not add up to 100.

Why rendezvous rather than cutting [0, 1) into ranges: a version's score depends only on the
key, the version and its own weight. So the choice is a pure function of key and split (every
gateway process, on every machine, after every restart agrees), raising one version's weight
lowers only its own scores (keys move only towards it), and adding or removing a version
moves only the keys it wins or held. Range cutting reshuffles keys between the other
versions whenever a boundary moves.

Pure standard library plus :func:`hashing.ring.hash64`; nothing here knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from hashing.ring import hash64

_MANTISSA_BITS = 53  # a float holds this many bits exactly, so u below is exact and never 0 or 1


def unit_hash(key: str, version: str) -> float:
    """A stable number in (0, 1) for (key, version); the key is length-prefixed so pairs never run together."""
    raw = key.encode()
    h = hash64(len(raw).to_bytes(8, "big") + raw + version.encode())
    return ((h >> (64 - _MANTISSA_BITS)) + 0.5) / (1 << _MANTISSA_BITS)


def choose_version(key: str, weights: Mapping[str, float]) -> str:
    """The version ``key`` is sent to under ``weights`` (version -> share; zero shares get nothing).

    Raises ValueError unless every weight is a finite number >= 0 and some weight is > 0.
    Equal scores (a probability-zero event) go to the smaller version name, so the answer
    never depends on the mapping's order.
    """
    best: tuple[float, str] | None = None
    for version, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight of version {version!r} must be a finite number >= 0, got {weight!r}")
        if weight == 0:
            continue
        candidate = (-math.log(unit_hash(key, version)) / weight, version)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        raise ValueError("a split needs some version with a weight > 0")
    return best[1]
