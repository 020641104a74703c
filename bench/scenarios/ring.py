"""``ring``: how hashing.ring.Ring spreads 1,000,000 keys over 3…10 nodes and how many move on a change.

No servers: the ring is a plain data structure. For N nodes it reports the busiest node over
the mean and the coefficient of variation of keys per node, the share of keys that change owner
when node N+1 joins (ideal 1/(N+1)) and when one of the N leaves (ideal 1/N), and checks that a
join only moves keys to the newcomer.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

from bench.results import scenario_document
from bench.scenarios.spec import Context, Scenario
from bench.stats import balance
from hashing.ring import DEFAULT_VNODES, Ring


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys to place")
    parser.add_argument("--min-nodes", type=int, default=3)
    parser.add_argument("--max-nodes", type=int, default=10)
    parser.add_argument("--vnodes", type=int, default=DEFAULT_VNODES, help="virtual nodes per node")


def node(i: int) -> str:
    return f"worker_{i}"


def owners(keys: list[str], nodes: list[str], vnodes: int, removed: str | None = None) -> list[str]:
    """The owner of every key on a ring of ``nodes`` (built whole, then ``removed`` taken out)."""
    ring = Ring(vnodes)
    for n in nodes:
        ring.add(n)
    if removed is not None:
        ring.remove(removed)
    return [ring.lookup(k) for k in keys]


def moved(before: list[str], after: list[str]) -> float:
    return sum(a != b for a, b in zip(before, after, strict=True)) / len(before)


def ring_point(keys: list[str], n: int, vnodes: int, now: list[str], grown: list[str]) -> dict[str, Any]:
    """Balance of ``now`` (owners on n nodes) and movement to ``grown`` (n+1) and to n-1 nodes."""
    nodes = [node(i) for i in range(1, n + 1)]
    counts = Counter(now)
    spread = balance({name: counts.get(name, 0) for name in nodes})
    shrunk = owners(keys, nodes, vnodes, removed=node(1))  # the first node leaves: its keys move
    newcomer = node(n + 1)
    strays = sum(a != b and b != newcomer for a, b in zip(now, grown, strict=True))
    return {
        "nodes": n,
        "keys_per_node": {name: counts.get(name, 0) for name in nodes},
        "max_over_mean": spread["max_over_mean"],
        "cv": spread["cv"],
        "moved_on_add": moved(now, grown),
        "ideal_on_add": 1 / (n + 1),
        "moved_to_others_on_add": strays / len(keys),  # must be 0: a join moves keys only to the newcomer
        "moved_on_remove": moved(now, shrunk),
        "ideal_on_remove": 1 / n,
    }


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    keys = [f"user-{i}" for i in range(args.keys)]
    by_size = {}
    for n in range(args.min_nodes, args.max_nodes + 2):
        by_size[n] = owners(keys, [node(i) for i in range(1, n + 1)], args.vnodes)
        print(f"ring: {n} nodes placed", file=sys.stderr)
    points = [
        ring_point(keys, n, args.vnodes, by_size[n], by_size[n + 1]) for n in range(args.min_nodes, args.max_nodes + 1)
    ]
    config = {
        "keys": args.keys,
        "nodes": [args.min_nodes, args.max_nodes],
        "vnodes": args.vnodes,
        "description": f"{args.keys:,} keys, {args.vnodes} vnodes",
        "command": ctx.command,
    }
    finding = {"keys": args.keys, "vnodes": args.vnodes, "hash": "blake2b-64 (hashing.ring.hash64)", "points": points}
    return scenario_document(ctx.name, config, ctx.machine, findings={"ring": finding})


SCENARIO = Scenario(
    "ring",
    "1,000,000 keys over 3..10 nodes, 150 vnodes: balance and keys moved",
    add_arguments,
    run,
    {"keys": 20_000, "min_nodes": 3, "max_nodes": 4},
)
