"""``floor``: a bare Flask app under granian with the gateway's settings, parsing ringserve's ``/infer``
body and answering a constant, driven by wrk.

Its CPU per request (the granian process tree; wrk's own beside it) is what any Flask gateway costs
on this machine before it does its own work: ringserve's gateway reads as this floor plus its part.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import trial
from bench.cli import add_load_arguments, load_from_args
from bench.peers import FLOOR
from bench.peers.launch import WEB_PROCESSES, WEB_THREADS
from bench.results import scenario_document
from bench.scenarios.spec import Context, Scenario

SERVER = f"bare Flask, granian --interface wsgi, {WEB_PROCESSES} processes x {WEB_THREADS} blocking threads"
TINY = {"duration": 1.0, "concurrent": 4, "warmup": 10, "wrk_threads": 1}


def add_wrk_arguments(parser: argparse.ArgumentParser, duration: float) -> None:
    """Load options for a run driven by wrk: ``--duration`` seconds, ``--concurrent`` connections."""
    add_load_arguments(parser, requests=None, duration=duration, concurrent=50)
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk's threads (wrk -t)")


@contextmanager
def running_floor(model: str) -> Iterator[trial.Target]:
    """The floor, started for a measurement and stopped after (PeerUnavailable when it cannot run)."""
    with trial.peer_target(FLOOR, model, workers=1) as target:  # the floor has no workers
        yield dataclasses.replace(target, config={"system": FLOOR, "server": SERVER})


def finding(run: dict[str, Any]) -> dict[str, Any]:
    """Throughput, p99 and CPU per request per process of a floor run."""
    return {
        "server": SERVER,
        "throughput_rps": run["summary"]["throughput_rps"],
        "p99_ms": run["summary"]["latency_ms"]["p99"],
        "cpu_ms_per_request": run["server"]["cpu"]["cpu_ms_per_request"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_wrk_arguments(parser, duration=10.0)


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    load = dataclasses.replace(load_from_args(args), api="infer")
    with running_floor(load.model) as target:
        floor = trial.by_wrk(ctx.name, FLOOR, target, load, ctx.machine, args.wrk_threads, args.warmup)
    config = {**floor["config"], "command": ctx.command}
    return scenario_document(ctx.name, config, ctx.machine, [floor], {"floor": finding(floor)})


SCENARIO = Scenario(
    FLOOR,
    "a bare Flask app under the gateway's WSGI server and settings, answering a constant: the HTTP floor",
    add_arguments,
    run,
    TINY,
)
