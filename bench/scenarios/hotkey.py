"""``hotkey``: Zipf-skewed keys (s=1.2), with bounded loads (RINGSERVE_LOAD_FACTOR=1.25) and without (0).

Reports requests per worker (max/mean) and the in-flight balance: GET /stats every 100 ms during
the run gives one gateway process's in-flight requests per worker; per sample the busiest worker
over the mean of all workers (absent ones count 0; samples with nothing in flight skipped), and
the median over samples. Target (issue #4): with bounded loads the busiest ≤ 1.25 × the mean.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.results import scenario_document
from bench.scenarios import live
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe
from tasks.settings import LOAD_FACTOR

TARGET_MAX_OVER_MEAN = 1.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=10.0, concurrent=50, zipf=1.2)
    parser.add_argument("--load-factor", type=float, default=LOAD_FACTOR, help="RINGSERVE_LOAD_FACTOR when bounded")


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    load = load_from_args(args)
    modes = {"bounded": str(args.load_factor), "unbounded": "0"}
    runs, points = [], {}
    for mode, factor in modes.items():
        label = f"{mode} (load factor {factor})"
        with RingServe(ctx.run_dir(mode), args.workers, {"LOAD_FACTOR": factor}) as system:
            timeline = live.Timeline(system.url)
            doc = trial.measure(system, ctx.name, label, load, ctx.machine, args.warmup, during=timeline)
        nodes = sorted({n for s in timeline.samples for n in s.get("members", [])})
        counts = doc["summary"]["nodes"]
        total = sum(counts.values())
        runs.append(doc)
        points[mode] = {
            "label": label,
            "load_factor": float(factor),
            "nodes": nodes,
            "requests_per_node": counts,
            "share_per_node": {n: counts.get(n, 0) / total if total else 0.0 for n in nodes},
            "requests_max_over_mean": doc["summary"]["balance"]["max_over_mean"],
            "in_flight": live.in_flight_balance(timeline.samples, nodes),
            "throughput_rps": doc["summary"]["throughput_rps"],
            "p99_ms": doc["summary"]["latency_ms"]["p99"],
            "failed": doc["summary"]["failed"],
        }
    finding = {"zipf": args.zipf, "modes": points, "target_in_flight_max_over_mean": TARGET_MAX_OVER_MEAN}
    config = {**runs[0]["config"], "load_factors": modes, "command": ctx.command}
    config.pop("settings", None)
    return scenario_document(ctx.name, config, ctx.machine, runs, {"hotkey": finding})


SCENARIO = Scenario(
    "hotkey",
    "Zipf s=1.2 keys, with and without bounded loads",
    add_arguments,
    run,
    {"requests": None, "duration": 1.5, "concurrent": 4, "workers": 2, "warmup": 10},
)
