"""``compare``: ringserve and the peers of :mod:`bench.peers`, one after the other, same model and load.

The in-process ceiling of the same model (batch 32, every core) is measured in the same run, so
each server's throughput can be read as a share of what the machine computes without serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from bench import ceiling, trial
from bench.cli import load_from_args
from bench.results import scenario_document
from bench.scenarios.spec import TINY_LOAD, Context, Scenario, add_served_arguments
from tasks.settings import MAX_BATCH_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=5_000, concurrent=50)
    parser.add_argument("--peers", nargs="*", help="peers to run after ringserve (default: all of bench.peers.PEERS)")
    parser.add_argument("--ceiling-duration", type=float, default=5.0, help="seconds per in-process ceiling point")


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    load = dataclasses.replace(load_from_args(args), api="infer")  # the one API every peer speaks
    runs = [
        trial.served(
            ctx.name, "ringserve", load, ctx.machine, ctx.run_dir("ringserve"), args.workers, warmup=args.warmup
        )
    ]
    skipped: dict[str, str] = {}
    names = trial.known_peers() if args.peers is None else tuple(args.peers)
    for name in names:
        try:
            runs.append(trial.peer(ctx.name, name, load, ctx.machine, args.workers, args.warmup))
        except trial.PeerUnavailable as exc:
            skipped[name] = str(exc)
            print(f"skipping peer {name}: {exc}", file=sys.stderr)
    top = ceiling.point(args.model, MAX_BATCH_SIZE, args.ceiling_duration, os.cpu_count() or 1)
    findings = {
        "ceiling": {"points": [top]},
        "served_vs_ceiling": {r["label"]: r["summary"]["throughput_rps"] / top["rows_per_s"] for r in runs},
        "skipped": skipped,
    }
    config = {**runs[0]["config"], "peers": list(names), "command": ctx.command}
    config.pop("system", None)
    return scenario_document(ctx.name, config, ctx.machine, runs, findings)


SCENARIO = Scenario(
    "compare",
    "ringserve and the peers (bench/peers) side by side, plus the in-process ceiling",
    add_arguments,
    run,
    {**TINY_LOAD, "ceiling_duration": 0.3, "peers": ["naive"]},
)
