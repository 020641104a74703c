"""Command-line options shared by ``bench.run`` and the scenarios: what load to send."""

from __future__ import annotations

import argparse
from typing import Any

from bench.keys import KEY_SPACE, KeySpace
from bench.loadgen import Load
from bench.payload import APIS
from bench.transport import TRANSPORTS
from tasks.settings import MODEL_REPOSITORY

DEFAULT_URL = "http://127.0.0.1:8000"


def add_load_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """``--requests --concurrent --duration --model --api --keys --zipf --processes …``; ``defaults`` override."""
    group = parser.add_argument_group("load")
    group.add_argument("--requests", type=int, help="requests to send (with --duration: whichever ends first)")
    group.add_argument("--duration", type=float, help="seconds to send for, instead of (or as well as) --requests")
    group.add_argument("--concurrent", type=int, help="simulated users, each with one request in flight")
    group.add_argument(
        "--processes", type=int, help="client processes the users are spread over (cores for the client)"
    )
    group.add_argument("--model", help="model to ask")
    group.add_argument("--api", choices=APIS, help="infer: POST /infer; v2: POST /v2/models/<m>/infer")
    group.add_argument("--keys", type=int, help="size of the routing-key space")
    group.add_argument("--zipf", type=float, help="draw keys Zipf-distributed with this exponent (hot keys)")
    group.add_argument("--seed", type=int, help="seed for keys and inputs")
    group.add_argument("--timeout", type=float, help="seconds before a request counts as failed")
    group.add_argument("--transport", choices=TRANSPORTS, help="client HTTP implementation")
    group.add_argument("--warmup", type=int, help="requests sent and discarded before measuring")
    parser.set_defaults(
        requests=1000,
        duration=None,
        concurrent=20,
        processes=1,
        model="digits",
        api="infer",
        keys=KEY_SPACE,
        zipf=None,
        seed=0,
        timeout=30.0,
        transport="raw",
        warmup=200,
    )
    parser.set_defaults(**defaults)


def load_from_args(args: argparse.Namespace, url: str = DEFAULT_URL) -> Load:
    return Load(
        url=url,
        model=args.model,
        api=args.api,
        requests=args.requests,
        duration_s=args.duration,
        concurrent=args.concurrent,
        processes=args.processes,
        keys=KeySpace(args.keys, args.zipf),
        seed=args.seed,
        timeout_s=args.timeout,
        transport=args.transport,
        model_repository=MODEL_REPOSITORY,
    )
