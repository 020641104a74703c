"""``join``: a live join: start with 2 workers, and at half time (``--add-at``) ``./docker-free-run.sh add-worker``.

Reports the failed requests (target 0), when the new worker announced itself in Redis and when
every gateway /stats sample (every 100 ms) showed it (target ≤ 2 s after the announcement), the
requests per worker before and after, and which keys moved, observed in the answers
(:mod:`bench.scenarios.owners`): for every key answered both before the new worker was announced
and after every /stats sample showed it, the node that answered it in each phase. Targets: share
moved ≤ 1.1 × the ideal 1/(N+1); every moved key moved to the new worker, none between the old
ones; a key answered twice within a phase by one node (affinity ≥ 99 %). The share the 2-node to
3-node ``hashing.ring.Ring`` would move is given beside it, computed, for comparison.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.results import records_of
from bench.scenarios import live, owners
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe
from tasks.settings import Settings

TARGETS = {
    "failed": 0,
    "shown_after_announced_s": 2.0,
    "moved_over_ideal": 1.1,
    "moved_between_old": 0,
    "affinity": owners.AFFINITY_TARGET,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=20.0, concurrent=owners.CONCURRENT, keys=owners.KEYS)
    parser.set_defaults(workers=2)
    parser.add_argument(
        "--add-at",
        type=float,
        default=0.5,
        help="when to add the worker, as a fraction of --duration (it takes seconds to boot before it joins)",
    )


def last_without(timeline: live.Timeline, node: str, before: float, default: float) -> float:
    """Time of the last Redis sample before ``before`` that did not list ``node`` as announced."""
    return max(
        (s["t"] for s in timeline.samples if s["t"] < before and "announced" in s and node not in s["announced"]),
        default=default,
    )


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if not args.duration:
        raise SystemExit("join needs --duration (the worker is added at --add-at of it, by default half)")
    if not 0 <= args.add_at < 1:
        raise SystemExit(f"--add-at is a fraction of --duration in [0, 1), got {args.add_at:g}")
    load = load_from_args(args)
    duration: float = args.duration
    added: list[str] = []

    def script(tl: live.Timeline) -> None:
        tl.sleep_until(duration * args.add_at)
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
    # before: answered before the announcement; after: started once every /stats sample showed the new worker
    before_until = last_without(timeline, new, math.inf if announced is None else announced, start)
    after_from = math.inf if shown is None else shown
    before, after = owners.Phase.of(records, until_s=before_until), owners.Phase.of(records, since_s=after_from)
    moves = owners.Moves.between(before, after)
    ideal = 1 / (len(initial) + 1)
    seen = owners.observed(before, after, moves, ideal)
    seen["moved_to_new"] = sum(to == new for _, to in moves.moved.values())
    seen["moved_between_old"] = len(moves.moved) - seen["moved_to_new"]
    moved_share = owners.computed_moved(
        args.keys, dict.fromkeys(initial, 1.0), dict.fromkeys([*initial, new], 1.0), vnodes
    )
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
        **owners.change_finding(
            doc,
            records,
            timeline,
            (before_until, after_from),
            seen,
            {"vnodes": vnodes, "moved_share": moved_share},
            {"keys": args.keys, "concurrent": args.concurrent},
            TARGETS,
        ),
    }
    return live.one_run_document(ctx, doc, finding, add_at=args.add_at)


SCENARIO = Scenario(
    "join",
    f"2 workers, add-worker at half time (live join), {owners.CONCURRENT} users over {owners.KEYS:,} keys",
    add_arguments,
    run,
    # early and long enough that the new worker (5-10 s to boot on a busy machine) serves a few seconds
    {"requests": None, "duration": 16.0, "add_at": 0.1, "concurrent": 4, "workers": 2, "warmup": 10, "keys": 50},
)
