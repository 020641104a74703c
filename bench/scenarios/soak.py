"""``soak``: the medium load (50 users) for 10 minutes, with memory sampled throughout.

Every ``--sample-every`` seconds it reads Redis's ``used_memory`` (``INFO memory``) and the resident
memory of every process of the system (each supervisord program with the processes it forked: the
gateway's granian workers count toward ``gateway``). Reports, per series, the mean of the first
minute's samples and of the last minute's, and their ratio. Target (issue #9): every last-minute
value within 10 % of its first-minute value, i.e. nothing grows without bound under steady load.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from redis import Redis

from bench import procs, trial
from bench.cli import load_from_args
from bench.results import records_of
from bench.scenarios import live
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe

TARGETS = {"last_to_first_minute_max_ratio": 1.10}
WINDOW_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=600.0, concurrent=50)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--window", type=float, default=WINDOW_S, help="seconds of 'first' and 'last' minute")


def memory_sample(system: RingServe, redis: Redis) -> dict[str, int]:
    """Bytes: Redis ``used_memory`` and each program's resident memory (with what it forked)."""
    sample = {"redis_used_memory": int(redis.info("memory")["used_memory"])}
    tree = procs.children_map()
    for name, pid in system.pids().items():
        sample[f"{name}_rss"] = sum(procs.rss_bytes(p) or 0 for p in procs.descendants(pid, tree))
    return sample


def drift(samples: list[dict[str, Any]], window_s: float, end_s: float) -> dict[str, dict[str, float | None]]:
    """Per series: the mean of the samples in the first and in the last ``window_s``, and last / first."""
    series = sorted({k for s in samples for k in s if k != "t"})
    out: dict[str, dict[str, float | None]] = {}
    for name in series:
        first = [s[name] for s in samples if name in s and s["t"] <= window_s]
        last = [s[name] for s in samples if name in s and s["t"] >= end_s - window_s]
        a = statistics.fmean(first) if first else None
        b = statistics.fmean(last) if last else None
        out[name] = {"first_mb": _mb(a), "last_mb": _mb(b), "ratio": None if not a or b is None else round(b / a, 4)}
    return out


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 1e6, 3)


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if not args.duration:
        raise SystemExit("soak needs --duration")
    load = load_from_args(args)
    samples: list[dict[str, Any]] = []

    def script(tl: live.Timeline) -> None:
        with Redis.from_url(system.redis_url) as redis:
            while tl.now() < args.duration:
                samples.append({"t": round(tl.now(), 3), **memory_sample(system, redis)})
                tl.sleep_until(tl.now() + args.sample_every)

    with RingServe(ctx.run_dir("soak"), args.workers) as system:
        timeline = live.Timeline(system.url, script, interval_s=1.0)
        doc = trial.measure(system, ctx.name, "soak", load, ctx.machine, args.warmup, during=timeline)
    if timeline.error is not None:
        raise timeline.error
    window = min(args.window, args.duration / 3)
    memory = drift(samples, window, samples[-1]["t"] if samples else 0.0)
    ratios = [m["ratio"] for m in memory.values() if m["ratio"] is not None]
    summary = doc["summary"]
    finding = {
        "duration_s": args.duration,
        "window_s": window,
        "memory": memory,
        "worst": max(memory, key=lambda k: memory[k]["ratio"] or 0.0) if memory else None,
        "max_ratio": max(ratios, default=None),
        "failed": summary["failed"],
        "throughput_rps": summary["throughput_rps"],
        "series": live.per_second(records_of(doc)),
        "memory_samples": samples,
        "targets": TARGETS,
    }
    return live.one_run_document(ctx, doc, finding)


SCENARIO = Scenario(
    "soak",
    "medium load for 10 minutes; Redis memory and every process's RSS sampled every 5 s",
    add_arguments,
    run,
    {"requests": None, "duration": 6.0, "concurrent": 4, "workers": 2, "warmup": 10}
    | {"sample_every": 1.0, "window": 2.0},
)
