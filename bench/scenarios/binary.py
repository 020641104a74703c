"""``binary``: the Open Inference Protocol's binary tensor extension against JSON, digits and heavy.

For each model, one ringserve (``--workers``, single-threaded BLAS) serves two wrk runs: the exact
request bytes ``tritonclient[http]`` sends with its defaults (binary input, binary outputs; built by
``InferenceServerClient.generate_request_body``, 1 row per request), then the same rows as v2 JSON.
The in-process batch-32 ceiling of the model (every core) is measured in the same run, and so is the
peer's (Mosec's) best JSON figure: the same rows as ``/infer`` JSON, each of its settings tried once
(workers × ``max_wait_ms`` at batch 32), the highest throughput kept with its setting. Reports rows/s
as a share of the ceiling, binary against the peer's best, and the gateway's CPU per request, binary
against JSON. Targets (issue #11): heavy, binary, 3 workers ≥ 50 % of the ceiling; gateway CPU per
heavy request ≥ 3 × lower than JSON; heavy, binary ≥ 1.5 × the peer's best JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from bench import ceiling, trial
from bench.cli import load_from_args
from bench.payload import BINARY
from bench.results import scenario_document
from bench.scenarios import compare, floor
from bench.scenarios.spec import Context, Scenario
from bench.system import RingServe
from tasks.settings import MAX_BATCH_SIZE

TARGETS = {
    "heavy_binary_share_of_ceiling": 0.5,
    "heavy_gateway_cpu_json_over_binary": 3.0,
    "heavy_binary_over_peer_best_json": 1.5,
}
APIS = {"v2": "JSON", BINARY: "binary (tritonclient's bytes)"}  # JSON first: it warms the system up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    floor.add_wrk_arguments(parser, duration=10.0)
    parser.add_argument("--workers", type=int, default=3, help="ringserve's workers")
    parser.add_argument("--models", nargs="+", default=["digits", "heavy"], help="models to measure")
    parser.add_argument("--ceiling-duration", type=float, default=5.0, help="seconds per in-process ceiling point")
    parser.add_argument("--peer", default="mosec", help="the peer whose best JSON figure binary meets; '' for none")
    parser.add_argument("--peer-workers", nargs="+", type=int, default=[1, 2, 3], help="the peer's workers tried")
    parser.add_argument(
        "--max-wait-ms", nargs="+", type=int, default=[1, 5, 20], help="mosec's max_wait_time tried (batch 32)"
    )


def gateway_ms(run: dict[str, Any]) -> float:
    return float(run["server"]["cpu"]["cpu_ms_per_request"].get("gateway", float("nan")))


def peer_best(ctx: Context, args: argparse.Namespace, model: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The peer at each of its settings, once, on ``/infer`` JSON: its best run's figures and setting,
    or why it did not run. Its runs join ``runs``."""
    load = dataclasses.replace(load_from_args(args), model=model, api="infer")  # the API every peer speaks
    configs = compare.plan([args.peer], args.peer_workers, {"mosec": {"max_wait_ms": args.max_wait_ms}})
    points: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}  # settings that did not run, and why
    for config in (c for c in configs if c.system == args.peer):
        try:
            with compare.started(config, ctx, model) as target:
                label = f"{model} {config.label}"
                doc = trial.by_wrk(ctx.name, label, target, load, ctx.machine, args.wrk_threads, args.warmup)
        except trial.PeerUnavailable as exc:
            skipped[config.label] = str(exc)
            print(f"skipping {config.label}: {exc}", file=sys.stderr)
            continue
        runs.append(doc)
        points.append({"setting": dict(config.setting), **compare.figures(doc)})
    if not points:
        return {"system": args.peer, "skipped": skipped}
    top = max(points, key=lambda p: p["throughput_rps"])
    return {"system": args.peer, "settings_tried": len(points), "skipped": skipped, **top}


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    per_model: dict[str, Any] = {}
    for model in args.models:
        load = dataclasses.replace(load_from_args(args), model=model)
        top = ceiling.point(model, MAX_BATCH_SIZE, args.ceiling_duration, os.cpu_count() or 1)
        by_api: dict[str, dict[str, Any]] = {}
        with RingServe(ctx.run_dir(model), args.workers, env=ceiling.SINGLE_THREADED) as system:
            target = trial.ringserve_target(system)
            for api in APIS:
                label = f"{model} {api}"
                doc = trial.by_wrk(
                    ctx.name, label, target, dataclasses.replace(load, api=api), ctx.machine, args.wrk_threads,
                    0 if api == BINARY else args.warmup,  # our Python client speaks JSON only; JSON runs first
                )  # fmt: skip
                runs.append(doc)
                rps = doc["summary"]["throughput_rps"]
                by_api[api] = {
                    "throughput_rps": rps,
                    "p99_ms": doc["summary"]["latency_ms"]["p99"],
                    "failed": doc["summary"]["failed"],
                    "share_of_ceiling": rps / top["rows_per_s"],  # 1 row per request
                    "gateway_cpu_ms_per_request": gateway_ms(doc),
                    "cpu_ms_per_request": doc["server"]["cpu"]["cpu_ms_per_request"],
                }
        per_model[model] = {
            "ceiling_rows_per_s": top["rows_per_s"],
            "apis": by_api,
            "gateway_cpu_json_over_binary": by_api["v2"]["gateway_cpu_ms_per_request"]
            / by_api[BINARY]["gateway_cpu_ms_per_request"],
            "binary_over_json_throughput": by_api[BINARY]["throughput_rps"] / by_api["v2"]["throughput_rps"],
        }
        if args.peer:
            peer = per_model[model]["peer_best_json"] = peer_best(ctx, args, model, runs)
            if "throughput_rps" in peer:
                binary_rps = by_api[BINARY]["throughput_rps"]
                per_model[model]["binary_over_peer_best_json"] = binary_rps / peer["throughput_rps"]
    findings = {"binary": {"models": per_model, "workers": args.workers, "targets": TARGETS}}
    config = {
        "workers": args.workers,
        "models": args.models,
        "peer": args.peer,
        "peer_workers": args.peer_workers,
        "max_wait_ms": args.max_wait_ms,
        "blas": ceiling.SINGLE_THREADED,
        "command": ctx.command,
    }
    return scenario_document(ctx.name, config, ctx.machine, runs, findings)


SCENARIO = Scenario(
    "binary",
    "tritonclient's binary request bytes against v2 JSON and the peer's best JSON, replayed with wrk, vs the ceiling",
    add_arguments,
    run,
    {
        **floor.TINY,
        "models": ["digits"],
        "ceiling_duration": 0.3,
        "workers": 2,
        "peer_workers": [1],
        "max_wait_ms": [5],
    },
)
