"""``scaling``: the same load against 1, 2, 3 and 4 workers, on a machine whose core count is stated."""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.results import scenario_document
from bench.scenarios.spec import TINY_LOAD, Context, Scenario, add_served_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=5_000, concurrent=50)
    parser.add_argument("--worker-counts", nargs="+", type=int, default=[1, 2, 3, 4], help="worker counts to try")


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    load = load_from_args(args)
    runs = [
        trial.served(ctx.name, f"{n}-workers", load, ctx.machine, ctx.run_dir(f"{n}-workers"), n, warmup=args.warmup)
        for n in args.worker_counts
    ]
    points = [
        {
            "workers": n,
            "label": run["label"],
            "throughput_rps": run["summary"]["throughput_rps"],
            "p99_ms": run["summary"]["latency_ms"]["p99"],
            "mean_batch_size": run["summary"]["mean_batch_size"],
        }
        for n, run in zip(args.worker_counts, runs, strict=True)
    ]
    findings = {"scaling": {"cores": os.cpu_count(), "points": points}}
    config = {**runs[0]["config"], "worker_counts": args.worker_counts, "command": ctx.command}
    config.pop("workers", None)
    return scenario_document(ctx.name, config, ctx.machine, runs, findings)


SCENARIO = Scenario(
    "scaling",
    "1, 2, 3, 4 workers, same load",
    add_arguments,
    run,
    {**TINY_LOAD, "worker_counts": [1, 2]},
)
