"""The ray peer: Ray Serve, ``workers`` replicas, each batching with ``@serve.batch``.

Batching as ringserve's defaults: up to 32 requests, waiting at most 20 ms. The server
process starts a private local Ray cluster (its files in the peer's log directory) and
shuts it down on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import sys

from bench.peers.launch import Launch
from bench.peers.process import Process

READY_TIMEOUT_S = 150.0  # a cold Ray start (GCS, raylet, controller, proxy, replicas) is slow
SETTINGS: tuple[str, ...] = ()
ROUTE = "/infer"
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report to the Internet
    # A single-node cluster on 127.0.0.1 (as Ray does on macOS): Ray's GCS, raylet, agents
    # and workers then listen on loopback only. Serve 2.60 replicas still open their
    # inter-deployment gRPC port on [::] (hard-coded in ray/serve/_private/replica.py).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def unavailable() -> str | None:
    # find_spec("ray.serve") imports "ray" and raises when it is absent: look at top-level names only.
    missing = [m for m in ("ray", "starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return f"ray[serve] is not installed (no {missing[0]}): pip install -r bench/requirements-peers.txt"
    return None


def start(launch: Launch, started: list[Process]) -> str:
    argv = [sys.executable, "-m", "bench.peers.ray.server", "--workers", str(launch.workers)]
    argv += ["--port", str(launch.port), "--route", ROUTE, "--temp-dir", str(launch.log_dir / "ray")]
    started.append(launch.process("ray", argv, **RAY_ENV))
    return f"http://127.0.0.1:{launch.port}{ROUTE}"
