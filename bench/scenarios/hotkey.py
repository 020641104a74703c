"""``hotkey``: Zipf-skewed keys (s=1.2) at 50 and at 200 users, each with bounded loads
(RINGSERVE_LOAD_FACTOR=1.25) and without (0), in 3 interleaved rounds (medians of throughput and p99).

Per run: throughput, p99, failed requests, the requests bounded loads sent past their owner
(``spilled_per_node`` of /stats, its change over the run) and the in-flight balance: GET /stats every
100 ms gives the rows in flight per worker summed over every gateway process (each publishes its own
every 100 ms under load, so a sample is up to ~0.1 s old and the processes' parts are not taken at one
instant); per sample the busiest worker over max(one batch of the model, 1.25 × the mean over workers),
its maximum over samples, and the median of busiest / mean. Targets (issue #8): with bounded loads the
busiest never above that bound (max ≤ 1); spills > 0 at 200 users; throughput and p99 with bounded
loads at least as good as without.

The model is ``heavy`` by default: bounded loads relieve a worker that a hot key overloads, which
needs workers that can be overloaded. With ``--model digits`` on a 2-core host the gateway is the
bottleneck (99 % busy) and a digits worker answers 32 rows in one cheap forward, so spreading a hot
key only adds batches for the gateway to answer (docs/benchmarks.md, "hotkey").
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.results import scenario_document
from bench.scenarios import live
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe
from tasks.metadata import load_repository
from tasks.settings import LOAD_FACTOR, MODEL_REPOSITORY, Settings

LEVELS = (50, 200)
TARGETS = {"in_flight_max_over_bound": 1.0, "spilled_at_200_users": "> 0", "bounded_vs_unbounded": ">= 1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=10.0, concurrent=None, zipf=1.2, model="heavy")
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=list(LEVELS),
        help="concurrent users of each pair of runs (bounded, then unbounded); --concurrent C means just C",
    )
    parser.add_argument("--load-factor", type=float, default=LOAD_FACTOR, help="RINGSERVE_LOAD_FACTOR when bounded")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each pair of runs, interleaved; medians")


def batch_rows(model: str, settings: Settings) -> int:
    """One batch of ``model``: its own max_batch_size, else the server-wide one (as the gateway's floor)."""
    meta = load_repository(Path(MODEL_REPOSITORY))[model]
    return meta.max_batch_size or settings.max_batch_size


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mode_result(
    label: str, factor: float, rounds: list[dict[str, Any]], batch: int, load_factor: float
) -> dict[str, Any]:
    """One mode at one level over its rounds: median throughput and p99, counts summed, and the
    in-flight balance over every sample of every round."""
    docs = [r["doc"] for r in rounds]
    samples = [s for r in rounds for s in r["samples"]]
    nodes = sorted({n for s in samples for n in s.get("members", [])})
    counts: Counter[str] = Counter()
    spilled: Counter[str] = Counter()
    for doc in docs:
        counts.update(doc["summary"]["nodes"])
        spilled.update(doc["server"]["stats"].get("spilled_per_node", {}))
    total = sum(counts.values())
    throughputs = [d["summary"]["throughput_rps"] for d in docs]
    p99s = [d["summary"]["latency_ms"]["p99"] for d in docs if d["summary"]["latency_ms"]["p99"] is not None]
    return {
        "label": label,
        "load_factor": factor,
        "nodes": nodes,
        "requests_per_node": dict(sorted(counts.items())),
        "share_per_node": {n: counts.get(n, 0) / total if total else 0.0 for n in nodes},
        "requests_max_over_mean": max(counts.values()) * len(counts) / total if total else None,
        "spilled": sum(spilled.values()),
        "spilled_per_node": dict(sorted(spilled.items())),
        "routed": sum(sum(d["server"]["stats"].get("requests_per_node", {}).values()) for d in docs),
        "in_flight": live.in_flight_balance(samples, nodes, batch, load_factor),
        "throughput_rps": statistics.median(throughputs),
        "throughput_rps_rounds": throughputs,
        "p99_ms": statistics.median(p99s) if p99s else None,
        "p99_ms_rounds": p99s,
        "failed": sum(d["summary"]["failed"] for d in docs),
    }


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    levels: list[int] = [args.concurrent] if args.concurrent else args.levels
    modes = {"bounded": str(args.load_factor), "unbounded": "0"}
    runs, points, batch = [], [], 0
    for users in levels:
        args.concurrent = users
        load = load_from_args(args)
        rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for i in range(args.rounds):  # interleaved: the machine's drift falls on both modes alike
            for mode, factor in modes.items():
                label = f"{mode} (load factor {factor}), {users} users, round {i + 1} of {args.rounds}"
                with RingServe(ctx.run_dir(f"{mode}-{users}-{i + 1}"), args.workers, {"LOAD_FACTOR": factor}) as system:
                    batch = batch_rows(args.model, Settings.from_env(system.env))
                    timeline = live.Timeline(system.url)
                    doc = trial.measure(system, ctx.name, label, load, ctx.machine, args.warmup, during=timeline)
                runs.append(doc)
                rounds[mode].append({"doc": doc, "samples": timeline.samples})
        point: dict[str, Any] = {"concurrent": users, "rounds": args.rounds, "modes": {}}
        for mode, factor in modes.items():
            point["modes"][mode] = _mode_result(
                f"{mode} (load factor {factor}), {users} users", float(factor), rounds[mode], batch, args.load_factor
            )
        on, off = point["modes"]["bounded"], point["modes"]["unbounded"]
        point["bounded_over_unbounded"] = {
            "throughput": ratio(on["throughput_rps"], off["throughput_rps"]),
            "p99": ratio(on["p99_ms"], off["p99_ms"]),  # < 1: bounded is better
        }
        points.append(point)
    finding = {
        "zipf": args.zipf,
        "batch_rows": batch,
        "bound_load_factor": args.load_factor,
        "levels": points,
        "targets": TARGETS,
    }
    config = {
        **runs[0]["config"],
        "load_factors": modes,
        "levels": levels,
        "rounds": args.rounds,
        "command": ctx.command,
    }
    config.pop("settings", None)
    config.pop("concurrent", None)
    return scenario_document(ctx.name, config, ctx.machine, runs, {"hotkey": finding})


SCENARIO = Scenario(
    "hotkey",
    "Zipf s=1.2 keys on heavy at 50 and 200 users, with and without bounded loads",
    add_arguments,
    run,
    {"requests": None, "duration": 1.5, "concurrent": 4, "workers": 2, "warmup": 10, "rounds": 1},
)
