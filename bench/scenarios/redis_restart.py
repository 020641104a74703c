"""``redis-restart``: the medium load for a fixed time; the system's Redis is SIGKILLed (``--kill-at``) and
started again ``--down-for`` seconds later (``supervisorctl start redis``; its automatic restart is off for
this run) on the same port, empty (no persistence: a new server, a new
``run_id``), as the run script starts it.

Gateways hold the requests in flight while Redis is down and re-send them to the new server; arrivals
while a gateway knows Redis is down get a fast 503. From the per-request records (on the timeline's
clock, exactly) it reports: the requests in flight at the kill and their outcomes (target: all 200 where
the request timeout outlasts the outage); every failure by status and by when it arrived (before the
kill, while Redis was down, after it answered again), hence the detection delays: kill → first 503
arrival, Redis up → last 503 arrival (target: 503s only for arrivals while Redis was down, plus that
delay); the slowest request against the request timeout (target: none past it); and the time from Redis
answering again to full service (target ≤ 3 s), defined as the later of

* **no failure after**: the arrival of the last request that failed, among those that arrived after the
  kill (0 when none arrived after Redis answered again), and
* **throughput back**: the start of the first 1 s window (sliding in 0.1 s steps, by end time) from Redis
  answering again whose successful requests reach 90 % of the pre-kill rate (successful requests ending
  before the kill / the kill's time).

With a closed loop, every user is soon waiting on a held request, so few (often no) requests arrive once
a gateway knows Redis is down: the detection delays are also measured by probing ``GET /v2/health/ready``
every 100 ms (503 while the answering gateway process cannot read Redis, the same condition as the fast
503). /stats is still sampled every 100 ms (it answers 503 while Redis is down); the gateway's /stats counters
start again from 0 with the new Redis, so ``server.stats`` of this run is not a count of the run.
"""

from __future__ import annotations

import argparse
import bisect
from collections.abc import Callable, Sequence
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.record import Record
from bench.scenarios import live
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.stats import status_key
from bench.system import RingServe
from tasks.settings import Settings

TARGETS = {"in_flight_at_kill_ok": "all whose timeout outlasts the outage", "full_service_after_up_s": 3.0}
BACK_SHARE = 0.9  # of the pre-kill rate: "throughput back"
WINDOW_S = 1.0
STEP_S = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=20.0, concurrent=50)
    parser.add_argument("--kill-at", type=float, default=8.0, help="seconds into the load when Redis is SIGKILLed")
    parser.add_argument("--down-for", type=float, default=3.0, help="seconds until it is started again")


def outcomes(records: Sequence[Record]) -> dict[str, int]:
    """Requests by outcome: "200" for a success, else as ``failed_by_status`` files it."""
    out: dict[str, int] = {}
    for r in records:
        key = "200" if r.ok else status_key(r)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def failures_by_arrival(records: Sequence[Record], kill: float, up: float) -> dict[str, dict[str, Any]]:
    """Per failure status: how many, arriving before the kill, while Redis was down, after it answered
    again; the first and last arrival."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted((r for r in records if not r.ok), key=lambda r: r.start_s):
        f = out.setdefault(
            status_key(r),
            {"count": 0, "before_kill": 0, "while_down": 0, "after_up": 0, "first_arrival_s": r.start_s},
        )
        f["count"] += 1
        f["before_kill" if r.start_s < kill else "while_down" if r.start_s < up else "after_up"] += 1
        f["last_arrival_s"] = r.start_s
    return out


def throughput_back(records: Sequence[Record], level_rps: float, after: float) -> float | None:
    """Start of the first ``WINDOW_S`` window from ``after`` (in ``STEP_S`` steps, by end time) whose
    successful requests per second reach ``BACK_SHARE`` × ``level_rps``; None if none does."""
    ends = sorted(r.end_s for r in records if r.ok)
    last = max(ends, default=after)
    step = 0
    while (t := after + step * STEP_S) + WINDOW_S <= last:
        done = bisect.bisect_left(ends, t + WINDOW_S) - bisect.bisect_left(ends, t)
        if done / WINDOW_S >= BACK_SHARE * level_rps:
            return t
        step += 1
    return None


def errors_by_status_per_s(records: Sequence[Record], bins: int) -> dict[str, list[int]]:
    """Failed requests per second and status, by end time, in the bins of :func:`live.per_second`."""
    out: dict[str, list[int]] = {}
    for r in records:
        if not r.ok:
            out.setdefault(status_key(r), [0] * bins)[min(int(max(r.end_s, 0.0)), bins - 1)] += 1
    return dict(sorted(out.items()))


def ready_since(samples: Sequence[dict[str, Any]], after: float) -> float | None:
    """The first readiness probe at or after ``after`` from which on every probe answered 200."""
    found: float | None = None
    for s in samples:
        if s["t"] >= after and "ready" in s:
            found = (s["t"] if found is None else found) if s["ready"] == 200 else None
    return found


def since(t: float | None, origin: float) -> float | None:
    return None if t is None else t - origin


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    kill_at, down_for = float(args.kill_at), float(args.down_for)
    if not args.duration or kill_at + down_for >= args.duration:
        raise SystemExit("redis-restart needs --duration longer than --kill-at + --down-for")
    load = load_from_args(args)

    def script(tl: live.Timeline) -> None:
        tl.sleep_until(kill_at)
        system.kill("redis")
        tl.event("kill")
        tl.sleep_until(kill_at + down_for)
        tl.event("restart")
        system.start_redis()
        tl.event("redis_up")

    # supervisord would restart Redis at once: here it stays down until the script starts it
    with RingServe(ctx.run_dir("redis-restart"), args.workers, {"REDIS_AUTORESTART": "false"}) as system:
        timeout_ms = Settings.from_env(system.env).request_timeout_ms
        timeline = live.Timeline(system.url, script, ready=True)
        doc = trial.measure(system, ctx.name, "redis-restart", load, ctx.machine, args.warmup, during=timeline)
    if timeline.error is not None:
        raise timeline.error
    kill, restart, up = (timeline.events[e] for e in ("kill", "restart", "redis_up"))
    records = timeline.aligned(doc)
    at_kill = [r for r in records if r.start_s <= kill < r.end_s]
    outlasting = [r for r in at_kill if r.start_s + timeout_ms / 1000 > up]
    while_down = [r for r in records if kill <= r.start_s < up]
    failures = failures_by_arrival(records, kill, up)
    level = sum(1 for r in records if r.ok and r.end_s < kill) / kill
    back = throughput_back(records, level, up)
    failed_after_kill = [r.start_s for r in records if not r.ok and r.start_s >= kill]
    no_failure_after = max(up, max(failed_after_kill, default=up))
    full = None if back is None else max(back, no_failure_after)
    first_503, last_503 = (failures.get("503", {}).get(k) for k in ("first_arrival_s", "last_arrival_s"))
    stats_back = timeline.first("members", lambda m: True, after=up)
    not_ready = next((s["t"] for s in timeline.samples if s["t"] >= kill and s.get("ready", 200) != 200), None)
    ready_again = ready_since(timeline.samples, up)
    series = live.per_second(records)
    longest = max(records, key=lambda r: r.latency_ms, default=None)

    def count(pick: Callable[[Record], bool]) -> int:
        return sum(1 for r in records if pick(r))

    finding = {
        "events_s": {
            "kill": kill,
            "restart": restart,
            "redis_up": up,
            "first_503": first_503,
            "last_503": last_503,
            "stats_back": stats_back,
            "not_ready": not_ready,
            "ready_again": ready_again,
            "throughput_back": back,
            "full_service": full,
        },
        "outage_s": up - kill,
        "request_timeout_ms": timeout_ms,
        "client_timeout_s": args.timeout,
        "in_flight_at_kill": {
            "requests": len(at_kill),
            "outcomes": outcomes(at_kill),
            "timeout_outlasts_outage": len(outlasting),
            "timeout_outlasts_outage_ok": sum(r.ok for r in outlasting),
            "max_ms": max((r.latency_ms for r in at_kill), default=None),
        },
        "arrived_while_down": {"requests": len(while_down), "outcomes": outcomes(while_down)},
        "arrived_after_up": outcomes([r for r in records if r.start_s >= up]),
        "failures": failures,
        "detection_s": {  # how long the gateways took to notice, seen by the load and by a readiness probe
            "down_first_503": since(first_503, kill),  # kill -> first 503 arrival
            "up_last_503": since(last_503, up),  # Redis up -> last 503 arrival (< 0: none after it answered)
            "down_not_ready": since(not_ready, kill),  # kill -> first probe answered 503
            "up_ready": since(ready_again, up),  # Redis up -> every probe from then on answered 200
            "probe_interval_s": live.SAMPLE_INTERVAL_S,
        },
        "latency": {
            "max_ms": None if longest is None else longest.latency_ms,
            "max_status": None if longest is None else ("200" if longest.ok else status_key(longest)),
            "over_timeout": count(lambda r: r.latency_ms > timeout_ms),
            "p99_before_kill_ms": live.p99_ms([r for r in records if r.end_s < kill]),
            "p99_in_flight_at_kill_ms": live.p99_ms(at_kill),
        },
        "recovery": {
            "pre_kill_rps": level,
            "back_share": BACK_SHARE,
            "window_s": WINDOW_S,
            "throughput_back_after_up_s": since(back, up),
            "no_failure_after_up_s": no_failure_after - up,
            "full_service_after_up_s": since(full, up),
        },
        "failed": doc["summary"]["failed"],
        "failed_by_status": doc["summary"]["failed_by_status"],
        "requests": len(records),
        "throughput_rps": doc["summary"]["throughput_rps"],
        "series": {**series, "errors_by_status_per_s": errors_by_status_per_s(records, len(series["t"]))},
        "samples": timeline.samples,
        "timeline_t0_monotonic_s": timeline.t0,  # with the run's client.origin_monotonic_s: Timeline.aligned
        "targets": TARGETS,
    }
    return live.one_run_document(ctx, doc, finding, kill_at_s=kill_at, down_for_s=down_for)


SCENARIO = Scenario(
    "redis-restart",
    "medium load for 20 s; SIGKILL Redis at 8 s, start it again (empty) 3 s later",
    add_arguments,
    run,
    {"requests": None, "duration": 5.0, "concurrent": 4, "workers": 1, "warmup": 10, "kill_at": 1.5, "down_for": 1.0},
)
