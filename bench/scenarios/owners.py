"""Who answered each routing key, as observed in the answers of a live run, and which keys moved.

The ``join`` and ``leave`` scenarios judge a membership change from the ``node`` field of real
answers, not from a ring computed offline: a *phase* is the successful requests that started and
ended within a time window (seconds of the records' clock), grouped by routing key. A key's
*owner* in a phase is the node that answered most of its requests there (ties: the first to
answer). A key answered by more than one node within one phase is *unstable*: the same key routed
twice did not land on the same node (issue 8 wants that for ≥ 99 % of the keys answered twice).
A key *moved* when its owner after the change differs from its owner before it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bench.keys import KeySpace
from bench.record import Record
from bench.scenarios import live
from hashing.ring import Ring

AFFINITY_TARGET = 0.99  # share of keys answered twice or more in a phase that a single node answered
# Default load of join and leave: a small key space, so that at 16 users most keys are answered several
# times in each phase (a key answered in only one phase, or only once, says nothing about movement or affinity).
KEYS = 1_000
CONCURRENT = 16


@dataclass(frozen=True)
class Phase:
    """Per key index: how many successful answers each node gave within one window."""

    answers: dict[int, Counter[str]]

    @classmethod
    def of(cls, records: Iterable[Record], since_s: float = 0.0, until_s: float = math.inf) -> Phase:
        """The successful, attributed requests with ``since_s <= start`` and ``end < until_s``."""
        answers: dict[int, Counter[str]] = {}
        for r in records:
            if r.ok and r.node and r.key is not None and r.start_s >= since_s and r.end_s < until_s:
                answers.setdefault(r.key, Counter())[r.node] += 1
        return cls(answers)

    def owner(self, key: int) -> str:
        return self.answers[key].most_common(1)[0][0]

    def unstable(self, key: int) -> bool:
        return len(self.answers[key]) > 1

    def affinity(self) -> dict[str, Any]:
        """Keys answered, keys answered at least twice, how many of those by several nodes, and the share by one."""
        repeated = [k for k, by in self.answers.items() if by.total() > 1]
        unstable = sum(self.unstable(k) for k in repeated)
        return {
            "keys": len(self.answers),
            "requests": sum(by.total() for by in self.answers.values()),
            "repeated": len(repeated),
            "unstable": unstable,
            "affinity": 1 - unstable / len(repeated) if repeated else None,
        }


@dataclass(frozen=True)
class Moves:
    """The keys answered in both phases and, for each that changed owner, (owner before, owner after)."""

    observed: list[int]
    moved: dict[int, tuple[str, str]]
    stable: list[int]  # keys of ``observed`` answered by a single node in each phase

    @classmethod
    def between(cls, before: Phase, after: Phase) -> Moves:
        observed = sorted(before.answers.keys() & after.answers.keys())
        owners = {k: (before.owner(k), after.owner(k)) for k in observed}
        stable = [k for k in observed if not before.unstable(k) and not after.unstable(k)]
        return cls(observed, {k: pair for k, pair in owners.items() if pair[0] != pair[1]}, stable)

    def routes(self) -> dict[str, int]:
        """Moved keys per route ``"<owner before> -> <owner after>"``, most first."""
        return dict(Counter(f"{a} -> {b}" for a, b in self.moved.values()).most_common())


def observed(before: Phase, after: Phase, moves: Moves, ideal: float) -> dict[str, Any]:
    """The part of a join's or leave's findings that comes from the answers (see the module's docstring)."""
    share = len(moves.moved) / len(moves.observed) if moves.observed else None
    moved_stable = sum(k in moves.moved for k in moves.stable)
    return {
        "keys_in_both": len(moves.observed),
        "moved": len(moves.moved),
        "moved_share": share,
        "ideal": ideal,
        "moved_over_ideal": None if share is None else share / ideal,
        "routes": moves.routes(),
        "stable_in_both": len(moves.stable),
        "moved_stable": moved_stable,
        "moved_share_stable": moved_stable / len(moves.stable) if moves.stable else None,
        "affinity": {"before": before.affinity(), "after": after.affinity(), "target": AFFINITY_TARGET},
    }


def computed_moved(keys: int, before: Mapping[str, float], after: Mapping[str, float], vnodes: int) -> float:
    """Share of keys ``user-0 .. user-<keys-1>`` whose ``hashing.ring.Ring.lookup`` owner differs between
    a ring of ``before`` and one of ``after`` (node -> weight): computed, not observed (no bounded loads)."""
    old, new = Ring.from_nodes(before, vnodes), Ring.from_nodes(after, vnodes)
    names = [KeySpace.name(i) for i in range(keys)]
    return sum(old.lookup(k) != new.lookup(k) for k in names) / keys


def change_finding(
    doc: dict[str, Any],
    records: list[Record],
    timeline: Any,
    phases: tuple[float, float],
    seen: dict[str, Any],
    computed: dict[str, Any],
    load: dict[str, Any],
    targets: dict[str, Any],
) -> dict[str, Any]:
    """The part of a join's or a leave's finding that both share: outcome, phases, keys, series.

    ``phases`` is (before until, after from) in seconds of the run; ``load`` the keys and users.
    """
    until_s, since_s = phases
    return {
        "phases_s": {"before_until": until_s, "after_from": None if math.isinf(since_s) else since_s},
        "failed": doc["summary"]["failed"],
        "failed_by_status": doc["summary"]["failed_by_status"],
        "requests_per_node_before": live.requests_per_node([r for r in records if r.end_s < until_s]),
        "requests_per_node_after": live.requests_per_node([r for r in records if r.start_s >= since_s]),
        **load,
        "observed": seen,
        "computed": computed,
        "series": live.per_second(records),
        "samples": timeline.samples,
        "targets": targets,
    }
