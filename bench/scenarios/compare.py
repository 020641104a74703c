"""``compare``: ringserve, the peers of :mod:`bench.peers` and the HTTP floor, each at its best setting on
this machine, same model and load, driven by wrk; plus the in-process ceiling of the same model.

Fair by construction:

* every system's setting is swept (workers for all, ``max_wait_ms`` for mosec) and its best one
  (highest median req/s) is reported with that setting: a peer held to our defaults proves nothing;
* every process runs BLAS single-threaded (``bench.ceiling.SINGLE_THREADED``), ringserve's too;
* wrk drives every server: our client costs 60–90 µs of CPU per request and would be the limit of
  any server above a few thousand req/s;
* rounds are interleaved: each round starts, measures and stops every configuration once, in the
  same order, so that drift on a shared machine hits all of them alike; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bench import ceiling, trial
from bench.cli import load_from_args
from bench.cpu import server_ms
from bench.results import scenario_document
from bench.scenarios import floor
from bench.scenarios.spec import Context, Scenario
from bench.system import RingServe
from tasks.settings import MAX_BATCH_SIZE

RINGSERVE = "ringserve"


@dataclass(frozen=True)
class Config:
    """One system at one setting, e.g. mosec with ``{"workers": 2, "max_wait_ms": 5}``."""

    system: str
    setting: Mapping[str, int]

    @property
    def label(self) -> str:
        return " ".join([self.system, *(f"{k}={v}" for k, v in self.setting.items())])


def plan(
    peers: Sequence[str], worker_counts: Sequence[int], sweeps: Mapping[str, Mapping[str, Sequence[int]]]
) -> list[Config]:
    """Every configuration of one round, in order: ringserve's, each peer's (workers × its own
    ``sweeps``), then the floor (which has no setting)."""
    configs = []
    for system in (RINGSERVE, *peers):
        axes = {"workers": worker_counts, **sweeps.get(system, {})}
        configs += [
            Config(system, dict(zip(axes, values, strict=True))) for values in itertools.product(*axes.values())
        ]
    return [*configs, Config(floor.FLOOR, {})]


@contextmanager
def started(config: Config, ctx: Context, model: str) -> Iterator[trial.Target]:
    """``config``'s system, started for one run and stopped after (PeerUnavailable for a peer that cannot run)."""
    if config.system == RINGSERVE:
        run_dir = ctx.run_dir(config.label.replace(" ", "-"))
        with RingServe(run_dir, config.setting["workers"], env=ceiling.SINGLE_THREADED) as system:
            yield trial.ringserve_target(system)
    elif config.system == floor.FLOOR:
        with floor.running_floor(model) as target:
            yield target
    else:
        settings = {k: str(v) for k, v in config.setting.items() if k != "workers"}
        with trial.peer_target(config.system, model, config.setting["workers"], settings) as target:
            yield target


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """What one round of one configuration measured."""
    s = run["summary"]
    return {
        "throughput_rps": s["throughput_rps"],
        "p50_ms": s["latency_ms"]["p50"],
        "p99_ms": s["latency_ms"]["p99"],
        "failed": s["failed"],
        "server_cpu_ms_per_request": server_ms(run["server"]["cpu"]["cpu_ms_per_request"]),
        "cpu_ms_per_request": run["server"]["cpu"]["cpu_ms_per_request"],
    }


def point(config: Config, rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A configuration's medians over its rounds (``rounds``: :func:`figures` of each), and the rounds."""

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    groups = sorted({g for r in rounds for g in r["cpu_ms_per_request"]})
    return {
        "label": config.label,
        "system": config.system,
        "setting": dict(config.setting),
        "throughput_rps": median("throughput_rps"),
        "p50_ms": median("p50_ms"),
        "p99_ms": median("p99_ms"),
        "server_cpu_ms_per_request": median("server_cpu_ms_per_request"),
        "cpu_ms_per_request": {
            g: statistics.median(r["cpu_ms_per_request"][g] for r in rounds if g in r["cpu_ms_per_request"])
            for g in groups
        },
        "rounds": list(rounds),
    }


def best(points: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each system's point with the highest median throughput, by system, in the order points come."""
    top: dict[str, dict[str, Any]] = {}
    for p in points:
        if p["system"] not in top or p["throughput_rps"] > top[p["system"]]["throughput_rps"]:
            top[p["system"]] = p
    return top


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round whose throughput is the median (the lower one of an even count): the run shown."""
    return sorted(runs, key=lambda r: r["summary"]["throughput_rps"])[(len(runs) - 1) // 2]


def measure_rounds(
    ctx: Context, args: argparse.Namespace, configs: Sequence[Config]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Every configuration once per round, round-robin; its runs by label, and the ones that did not start."""
    load = dataclasses.replace(load_from_args(args), api="infer")  # the one API every peer speaks
    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in configs}
    failed: dict[str, str] = {}
    for number in range(1, args.rounds + 1):
        for config in configs:
            if config.label in failed:
                continue
            try:
                with started(config, ctx, args.model) as target:
                    run = trial.by_wrk(ctx.name, config.label, target, load, ctx.machine, args.wrk_threads, args.warmup)
            except trial.PeerUnavailable as exc:
                failed[config.label] = str(exc)
                print(f"skipping {config.label}: {exc}", file=sys.stderr)
                continue
            run["config"]["round"] = number
            runs[config.label].append(run)
            print(
                f"round {number}/{args.rounds} {config.label}: {run['summary']['throughput_rps']:,.0f} req/s",
                file=sys.stderr,
            )
    return runs, failed


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    names = trial.known_peers() if args.peers is None else tuple(args.peers)
    skipped = {name: why for name in names if (why := trial.peer_unavailable(name)) is not None}
    for name, why in skipped.items():
        print(f"skipping peer {name}: {why}", file=sys.stderr)
    peers = [name for name in names if name not in skipped]
    configs = plan(peers, args.worker_counts, {"mosec": {"max_wait_ms": args.max_wait_ms}})
    runs, failed = measure_rounds(ctx, args, configs)
    skipped.update(failed)
    measured = [c for c in configs if runs[c.label]]
    points = [point(c, [figures(r) for r in runs[c.label]]) for c in measured]
    top = best(points)
    shown = [median_run(runs[p["label"]]) for p in top.values()]
    rows_per_s = ceiling.point(args.model, MAX_BATCH_SIZE, args.ceiling_duration, os.cpu_count() or 1)
    servers = {name: p for name, p in top.items() if name != floor.FLOOR}
    findings: dict[str, Any] = {
        "compare": {
            "method": {
                "client": f"wrk -t{args.wrk_threads} -c{args.concurrent}",
                "rounds": args.rounds,
                "duration_s": args.duration,
                "statistic": "median over rounds, rounds interleaved",
                "blas": ceiling.SINGLE_THREADED,
            },
            "configs": points,
            "best": {name: {k: v for k, v in p.items() if k != "rounds"} for name, p in top.items()},
            "winner": max(servers, key=lambda name: servers[name]["throughput_rps"]) if servers else None,
        },
        "ceiling": {"points": [rows_per_s]},
        "served_vs_ceiling": {p["label"]: p["throughput_rps"] / rows_per_s["rows_per_s"] for p in servers.values()},
        "skipped": skipped,
    }
    if floor.FLOOR in top:
        findings["floor"] = floor.finding(median_run(runs[top[floor.FLOOR]["label"]]))
    per_system = ("system", "workers", "settings", "server", "url", "round")
    config = {k: v for k, v in shown[0]["config"].items() if k not in per_system} if shown else {}
    config |= {
        "peers": list(names),
        "rounds": args.rounds,
        "worker_counts": args.worker_counts,
        "max_wait_ms": args.max_wait_ms,
        "blas": ceiling.SINGLE_THREADED,
        "command": ctx.command,
    }
    return scenario_document(ctx.name, config, ctx.machine, shown, findings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    floor.add_wrk_arguments(parser, duration=10.0)
    parser.add_argument("--peers", nargs="*", help="peers beside ringserve (default: all of bench.peers.PEERS)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    parser.add_argument("--worker-counts", nargs="+", type=int, default=[1, 2, 3], help="workers tried for each system")
    parser.add_argument(
        "--max-wait-ms", nargs="+", type=int, default=[1, 5, 20], help="mosec's max_wait_time tried (batch 32)"
    )
    parser.add_argument("--ceiling-duration", type=float, default=5.0, help="seconds per in-process ceiling point")


SCENARIO = Scenario(
    "compare",
    "ringserve, the peers (bench/peers) and the HTTP floor, each at its best setting, driven by wrk; plus the ceiling",
    add_arguments,
    run,
    {
        **floor.TINY,
        "rounds": 1,
        "worker_counts": [1],
        "max_wait_ms": [5],
        "peers": ["naive", "mosec"],
        "ceiling_duration": 0.3,
    },
)
