"""``client``: is the load generator fast enough? Our client (raw and aiohttp transports, 1 and 2
processes) and wrk, back to back against one ringserve, same load and duration.

Each client's CPU per request says how much it takes from the cores it shares with the system;
equal throughput with wrk says the client was not the limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from bench import trial, wrk
from bench.cli import load_from_args
from bench.results import scenario_document
from bench.scenarios.spec import TINY_LOAD, Context, Scenario, add_served_arguments
from bench.system import RingServe

CLIENTS = (("raw", 1), ("aiohttp", 1), ("raw", 2))  # (transport, processes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=10.0, concurrent=50)
    parser.add_argument("--wrk-threads", type=int, default=2)


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    load = load_from_args(args)
    runs, wrk_result = [], None
    with RingServe(ctx.run_dir("ringserve"), args.workers) as system:
        if wrk.available():
            trial.warm_up(dataclasses.replace(load, url=system.url), args.warmup)
            wrk_result = wrk.run(dataclasses.replace(load, url=system.url), args.wrk_threads)
            print(f"wrk: {wrk_result['throughput_rps']:,.0f} req/s", file=sys.stderr)
        else:
            print("wrk is not installed: only our own clients are measured", file=sys.stderr)
        for transport, processes in CLIENTS:
            variant = dataclasses.replace(load, transport=transport, processes=processes)
            label = f"{transport} x{processes}"
            runs.append(trial.measure(system, ctx.name, label, variant, ctx.machine, args.warmup))
    findings: dict[str, Any] = {"clients": {r["label"]: r["client"] for r in runs}}
    if wrk_result is not None:
        findings["wrk"] = wrk_result
    config = {**runs[0]["config"], "clients": [f"{t} x{p}" for t, p in CLIENTS], "command": ctx.command}
    return scenario_document(ctx.name, config, ctx.machine, runs, findings)


SCENARIO = Scenario(
    "client",
    "the load generator against wrk, same load on one ringserve",
    add_arguments,
    run,
    {**TINY_LOAD, "requests": None, "duration": 0.5, "wrk_threads": 1},
)
