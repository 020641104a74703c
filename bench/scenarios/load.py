"""``light``, ``medium``, ``heavy``: one load of a given size against ringserve (digits by default)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.scenarios.spec import TINY_LOAD, Context, Scenario, add_served_arguments

SIZES = {
    "light": {"requests": 1_000, "concurrent": 20},
    "medium": {"requests": 5_000, "concurrent": 50},
    "heavy": {"requests": 10_000, "concurrent": 100},
}


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    doc = trial.served(
        ctx.name, ctx.name, load_from_args(args), ctx.machine, ctx.run_dir(ctx.name), args.workers, warmup=args.warmup
    )
    doc["config"]["command"] = ctx.command
    return doc


SCENARIOS = tuple(
    Scenario(
        name,
        f"{size['requests']:,} requests, {size['concurrent']} concurrent",
        functools.partial(add_served_arguments, requests=size["requests"], concurrent=size["concurrent"]),
        run,
        TINY_LOAD,
    )
    for name, size in SIZES.items()
)
