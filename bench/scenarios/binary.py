"""``binary``: the Open Inference Protocol's binary tensor extension against JSON, digits and heavy.

For each model, one ringserve (``--workers``, single-threaded BLAS) serves two wrk runs: the exact
request bytes ``tritonclient[http]`` sends with its defaults (binary input, binary outputs; built by
``InferenceServerClient.generate_request_body``, 1 row per request), then the same rows as v2 JSON.
The in-process batch-32 ceiling of the model (every core) is measured in the same run. Reports rows/s
as a share of the ceiling and the gateway's CPU per request, binary against JSON. Targets (issue #11):
heavy, binary, 3 workers ≥ 50 % of the ceiling; gateway CPU per heavy request ≥ 3 × lower than JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from bench import ceiling, trial
from bench.cli import load_from_args
from bench.payload import BINARY
from bench.results import scenario_document
from bench.scenarios import floor
from bench.scenarios.spec import Context, Scenario
from bench.system import RingServe
from tasks.settings import MAX_BATCH_SIZE

TARGETS = {"heavy_binary_share_of_ceiling": 0.5, "heavy_gateway_cpu_json_over_binary": 3.0}
APIS = {"v2": "JSON", BINARY: "binary (tritonclient's bytes)"}  # JSON first: it warms the system up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    floor.add_wrk_arguments(parser, duration=10.0)
    parser.add_argument("--workers", type=int, default=3, help="ringserve's workers")
    parser.add_argument("--models", nargs="+", default=["digits", "heavy"], help="models to measure")
    parser.add_argument("--ceiling-duration", type=float, default=5.0, help="seconds per in-process ceiling point")


def gateway_ms(run: dict[str, Any]) -> float:
    return float(run["server"]["cpu"]["cpu_ms_per_request"].get("gateway", float("nan")))


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
    findings = {"binary": {"models": per_model, "workers": args.workers, "targets": TARGETS}}
    config = {"workers": args.workers, "models": args.models, "blas": ceiling.SINGLE_THREADED, "command": ctx.command}
    return scenario_document(ctx.name, config, ctx.machine, runs, findings)


SCENARIO = Scenario(
    "binary",
    "tritonclient's binary request bytes against v2 JSON, replayed with wrk, digits and heavy, vs the ceiling",
    add_arguments,
    run,
    {**floor.TINY, "models": ["digits"], "ceiling_duration": 0.3, "workers": 2},
)
