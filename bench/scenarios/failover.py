"""``failover``: the medium load for a fixed time; one worker is SIGKILLed at 1/3 and supervisord restarts it.

The restarted worker comes back under the same node id with a new incarnation; the gateways see the
incarnation change (or the old announcement expire, RINGSERVE_MEMBER_TTL_MS, whichever comes first)
and re-send what the dead process held. Reports the failed requests (by status), how long the worker
took to be back in the ring (its new incarnation announced in Redis, polled every 50 ms), the p99 of
the requests in flight while it was away (kill → back), and requests/s, p99 and errors per second.
Targets (issues #4 and #9): 0 failed, outage p99 ≤ 1 s, back in the ring ≤ 5 s after the kill.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.results import records_of
from bench.scenarios import live
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe
from tasks.settings import Settings

TARGETS = {"failed": 0, "outage_p99_ms": 1000.0, "back_after_kill_s": 5.0}
BACK_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=30.0, concurrent=50)
    parser.add_argument("--victim", default="worker_2", help="the worker to SIGKILL at 1/3")


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if not args.duration:
        raise SystemExit("failover needs --duration (the kill is at 1/3 of it)")
    load = load_from_args(args)
    victim: str = args.victim
    duration: float = args.duration

    def script(tl: live.Timeline) -> None:
        live.kill_until_back(tl, system, victim, duration / 3, BACK_TIMEOUT_S)

    with RingServe(ctx.run_dir("failover"), args.workers) as system:
        ttl_ms = Settings.from_env(system.env).member_ttl_ms
        timeline = live.Timeline(system.url, script)
        doc = trial.measure(system, ctx.name, "failover", load, ctx.machine, args.warmup, during=timeline)
    if timeline.error is not None:
        raise timeline.error
    kill, back = timeline.events["kill"], timeline.events.get("back")
    records = records_of(doc)
    outage = live.overlapping(records, kill, back if back is not None else kill + BACK_TIMEOUT_S)
    before = [r for r in records if r.end_s < kill]
    summary = doc["summary"]
    finding = {
        "victim": victim,
        "member_ttl_ms": ttl_ms,
        "events_s": {"kill": kill, "back": back},
        "back_after_kill_s": None if back is None else back - kill,
        "failed": summary["failed"],
        "failed_by_status": summary["failed_by_status"],
        "outage": {
            "requests": len(outage),
            "failed": sum(not r.ok for r in outage),
            "p99_ms": live.p99_ms(outage),
            "max_ms": max((r.latency_ms for r in outage), default=None),
            "over_1s": sum(r.latency_ms > 1000 for r in outage),  # e.g. those the killed worker held
        },
        "p99_before_kill_ms": live.p99_ms(before),
        "throughput_rps": summary["throughput_rps"],
        "series": live.per_second(records),
        "samples": timeline.samples,
        "targets": TARGETS,
    }
    return live.one_run_document(ctx, doc, finding, victim=victim)


SCENARIO = Scenario(
    "failover",
    "medium load for 30 s; SIGKILL worker_2 at 1/3; supervisord brings it back",
    add_arguments,
    run,
    {"requests": None, "duration": 6.0, "concurrent": 4, "workers": 3, "warmup": 10},
)
