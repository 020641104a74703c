"""``leave``: a live, graceful leave: 3 workers, and at half time one of them gets SIGTERM.

A worker stopped gracefully deletes its announcement at once, then answers what it holds
(``tasks.consumer``); the gateways drop it from their rings when they next read the members.
Reports the failed requests (target 0), when the leaver was gone from Redis and from every
gateway /stats sample (every 100 ms), the requests per worker before and after, and which keys
moved, observed in the answers (:mod:`bench.scenarios.owners`): for every key answered both
before the SIGTERM and after every /stats sample showed the ring without the leaver, the node
that answered it in each phase. Targets: every moved key was the leaver's, 0 keys of the other
workers moved; a key answered twice within a phase by one node (affinity ≥ 99 %). The ideal
share moved is the leaver's 1/N; the share the 3-node to 2-node ``hashing.ring.Ring`` would move
is given beside it, computed, for comparison.
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

TARGETS = {"failed": 0, "moved_others": 0, "answered_by_leaver_after": 0, "affinity": owners.AFFINITY_TARGET}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=20.0, concurrent=owners.CONCURRENT, keys=owners.KEYS)
    parser.add_argument("--leaver", default="worker_2", help="the worker sent SIGTERM at half time")


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if not args.duration:
        raise SystemExit("leave needs --duration (the worker leaves at half of it)")
    load = load_from_args(args)
    leaver: str = args.leaver
    duration: float = args.duration

    def script(tl: live.Timeline) -> None:
        tl.sleep_until(duration / 2)
        tl.event("sigterm")  # before the signal: every answer that ended earlier was routed by the old ring
        system.control("stop", leaver)  # supervisorctl stop: SIGTERM, and no restart

    with RingServe(ctx.run_dir("leave"), args.workers) as system:
        vnodes = Settings.from_env(system.env).vnodes
        timeline = live.Timeline(system.url, script, redis_url=system.redis_url)
        doc = trial.measure(system, ctx.name, "leave", load, ctx.machine, args.warmup, during=timeline)
    if timeline.error is not None:
        raise timeline.error
    sigterm = timeline.events["sigterm"]
    unannounced = timeline.first("announced", lambda a: leaver not in a, after=sigterm)
    gone = timeline.stable_since("members", lambda m: leaver not in m, after=sigterm)
    initial = sorted({n for s in timeline.samples if s["t"] < sigterm for n in s.get("members", [])})
    records = records_of(doc)
    after_from = math.inf if gone is None else gone
    before, after = owners.Phase.of(records, until_s=sigterm), owners.Phase.of(records, since_s=after_from)
    moves = owners.Moves.between(before, after)
    seen = owners.observed(before, after, moves, 1 / len(initial) if initial else math.nan)
    leavers = [k for k in moves.observed if before.owner(k) == leaver]
    seen["leaver_keys"] = len(leavers)
    seen["leaver_keys_moved"] = sum(k in moves.moved for k in leavers)
    seen["moved_others"] = len(moves.moved) - seen["leaver_keys_moved"]
    seen["answered_by_leaver_after"] = sum(by[leaver] for by in after.answers.values())  # target 0
    remaining = [n for n in initial if n != leaver]
    moved_share = (
        owners.computed_moved(args.keys, dict.fromkeys(initial, 1.0), dict.fromkeys(remaining, 1.0), vnodes)
        if remaining
        else None
    )
    finding = {
        "leaver": leaver,
        "initial_nodes": initial,
        "events_s": {"sigterm": sigterm, "unannounced": unannounced, "gone": gone},
        "gone_after_sigterm_s": None if gone is None else gone - sigterm,
        **owners.change_finding(
            doc,
            records,
            timeline,
            (sigterm, after_from),
            seen,
            {"vnodes": vnodes, "moved_share": moved_share},
            {"keys": args.keys, "concurrent": args.concurrent},
            TARGETS,
        ),
    }
    return live.one_run_document(ctx, doc, finding, leaver=leaver)


SCENARIO = Scenario(
    "leave",
    f"3 workers, one leaves gracefully (SIGTERM) at half time, {owners.CONCURRENT} users over {owners.KEYS:,} keys",
    add_arguments,
    run,
    {"requests": None, "duration": 6.0, "concurrent": 4, "workers": 3, "warmup": 10, "keys": 50},
)
