"""``batching``: the same load with dynamic batching on, then with RINGSERVE_MAX_BATCH_SIZE=1.

Also measures the model's in-process ceiling at the batch size the workers use, so the served
throughput can be stated as a share of what the machine computes without HTTP and queues.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench import ceiling, trial
from bench.cli import load_from_args
from bench.results import scenario_document
from bench.scenarios.spec import TINY_LOAD, Context, Scenario, add_served_arguments
from tasks.settings import MAX_BATCH_SIZE

MODES = {"on": {}, "off": {"MAX_BATCH_SIZE": "1"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, model="heavy", requests=2_000, concurrent=64)
    parser.add_argument("--ceiling-duration", type=float, default=5.0, help="seconds per in-process ceiling point")


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    load = load_from_args(args)
    runs = {
        mode: trial.served(
            ctx.name, f"batching-{mode}", load, ctx.machine, ctx.run_dir(mode), args.workers, settings, args.warmup
        )
        for mode, settings in MODES.items()
    }
    cores = os.cpu_count() or 1
    top = ceiling.point(args.model, MAX_BATCH_SIZE, args.ceiling_duration, cores)
    summaries = {mode: run["summary"] for mode, run in runs.items()}
    rps = {mode: s["throughput_rps"] for mode, s in summaries.items()}
    findings = {
        "batching": {
            "labels": {mode: run["label"] for mode, run in runs.items()},
            "throughput_rps": rps,
            "throughput_ratio": rps["on"] / rps["off"] if rps["off"] else None,
            "p99_ms": {mode: s["latency_ms"]["p99"] for mode, s in summaries.items()},
            "mean_batch_size": {mode: s["mean_batch_size"] for mode, s in summaries.items()},
        },
        "ceiling": {"points": [top]},
        "served_vs_ceiling": {run["label"]: rps[mode] / top["rows_per_s"] for mode, run in runs.items()},
    }
    config = {**runs["on"]["config"], "modes": MODES, "command": ctx.command}
    return scenario_document(ctx.name, config, ctx.machine, list(runs.values()), findings)


SCENARIO = Scenario(
    "batching",
    "model heavy, dynamic batching on vs max_batch_size=1, same load",
    add_arguments,
    run,
    {**TINY_LOAD, "ceiling_duration": 0.3, "model": "heavy", "requests": 40},
)
