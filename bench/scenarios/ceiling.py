"""``ceiling``: models in-process at batch 1 and 32, on one core and on every core (rows/s)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench import ceiling
from bench.results import scenario_document
from bench.scenarios.spec import Context, Scenario


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["digits", "heavy"], help="models to measure")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="batch sizes (rows per forward)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")


def points(models: list[str], batches: list[int], duration_s: float) -> list[dict[str, Any]]:
    """Every model at every batch size on one core, and at the largest batch on every core."""
    cores = os.cpu_count() or 1
    found = [ceiling.point(m, b, duration_s) for m in models for b in batches]
    if cores > 1:
        found += [ceiling.point(m, max(batches), duration_s, cores) for m in models]
    return found


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    config = {
        "models": args.models,
        "batches": args.batches,
        "duration_s": args.duration,
        "blas_threads": 1,
        "description": f"in-process forward, single-threaded BLAS, {args.duration:g} s per point",
        "command": ctx.command,
    }
    found = points(args.models, args.batches, args.duration)
    return scenario_document(ctx.name, config, ctx.machine, findings={"ceiling": {"points": found}})


SCENARIO = Scenario(
    "ceiling",
    "the model in-process, no HTTP or queue: rows/s at batch 1 and 32",
    add_arguments,
    run,
    {"models": ["digits"], "batches": [32], "duration": 0.3},
)
