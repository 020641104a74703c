"""``join``: a live join: start with 2 workers, and at half time ``./docker-free-run.sh add-worker``.

Reports the failed requests (target 0), when the new worker announced itself in Redis and when
every gateway /stats sample (every 100 ms) showed it (target ≤ 2 s after the announcement), the
requests per worker before and after, and the share of the run's keys that changed owner from the
2-node to the 3-node ``hashing.ring.Ring`` (ideal 1/3; target ≤ 1.1 × ideal).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.keys import KeySpace
from bench.results import records_of
from bench.scenarios import live
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe
from hashing.ring import Ring
from tasks.settings import Settings

TARGETS = {"failed": 0, "shown_after_announced_s": 2.0, "moved_over_ideal": 1.1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=20.0, concurrent=50)
    parser.set_defaults(workers=2)


def keys_moved(keys: int, before: list[str], added: str, vnodes: int) -> float:
    """Share of keys ``user-0 .. user-<keys-1>`` whose owner differs between the ring of ``before`` and
    that ring with ``added``."""
    old, new = Ring(vnodes), Ring(vnodes)
    for n in before:
        old.add(n)
        new.add(n)
    new.add(added)
    names = [KeySpace.name(i) for i in range(keys)]
    return sum(old.lookup(k) != new.lookup(k) for k in names) / keys


def counts(records: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.ok and r.node:
            out[r.node] = out.get(r.node, 0) + 1
    return dict(sorted(out.items()))


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if not args.duration:
        raise SystemExit("join needs --duration (the worker is added at half of it)")
    load = load_from_args(args)
    duration: float = args.duration
    added: list[str] = []

    def script(tl: live.Timeline) -> None:
        tl.sleep_until(duration / 2)
        tl.event("add-worker")
        added.append(system.add_worker())
        tl.event("add-worker returned")

    with RingServe(ctx.run_dir("join"), args.workers) as system:
        vnodes = Settings.from_env(system.env).vnodes
        timeline = live.Timeline(system.url, script, redis_url=system.redis_url)
        doc = trial.measure(system, ctx.name, "join", load, ctx.machine, args.warmup, during=timeline)
    if timeline.error is not None:
        raise timeline.error
    new = added[0]
    start = timeline.events["add-worker"]
    announced = timeline.first("announced", lambda a: new in a, after=start)
    shown_first = timeline.first("members", lambda m: new in m, after=start)
    shown = timeline.stable_since("members", lambda m: new in m, after=start)
    initial = sorted({n for s in timeline.samples if s["t"] < start for n in s.get("members", [])})
    records = records_of(doc)
    moved = keys_moved(args.keys, initial, new, vnodes)
    ideal = 1 / (len(initial) + 1)
    finding = {
        "added": new,
        "initial_nodes": initial,
        "events_s": {
            "add_worker": start,
            "announced": announced,
            "shown_first": shown_first,
            "shown": shown,
            "add_worker_returned": timeline.events.get("add-worker returned"),
        },
        "shown_after_announced_s": None if shown is None or announced is None else shown - announced,
        "failed": doc["summary"]["failed"],
        "failed_by_status": doc["summary"]["failed_by_status"],
        "requests_per_node_before": counts([r for r in records if r.start_s < start]),
        "requests_per_node_after": counts([r for r in records if shown is not None and r.start_s >= shown]),
        "keys": args.keys,
        "vnodes": vnodes,
        "keys_moved": moved,
        "ideal_moved": ideal,
        "moved_over_ideal": moved / ideal,
        "series": live.per_second(records),
        "samples": timeline.samples,
        "targets": TARGETS,
    }
    return live.one_run_document(ctx, doc, finding)


SCENARIO = Scenario(
    "join",
    "2 workers, add-worker at half time (live join)",
    add_arguments,
    run,
    {"requests": None, "duration": 5.0, "concurrent": 4, "workers": 2, "warmup": 10},
)
