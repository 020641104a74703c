"""The mosec peer: mosec's Rust HTTP front batching requests for ``workers`` Python processes.

Dynamic batching of up to 32 requests, waiting at most ``max_wait_ms`` (a setting; 20 ms, as
ringserve's default, when not given): the knob a mosec user tunes for their load, so ``compare``
sweeps it rather than hold mosec to our default.
"""

from __future__ import annotations

import importlib.util
import sys

from bench.peers.launch import Launch
from bench.peers.process import Process

READY_TIMEOUT_S = 60.0
SETTINGS: tuple[str, ...] = ("max_wait_ms",)
ROUTE = "/infer"  # ringserve's route, so that the load generator posts to the same path
REQUEST_TIMEOUT_MS = 30_000  # mosec's default (3 s) would turn queueing under overload into 408s


def unavailable() -> str | None:
    if importlib.util.find_spec("mosec") is None:
        return "mosec is not installed: pip install -r bench/requirements-peers.txt"
    return None


def start(launch: Launch, started: list[Process]) -> str:
    argv = [sys.executable, "-m", "bench.peers.mosec.server", "--workers", str(launch.workers)]
    argv += ["--address", "127.0.0.1", "--port", str(launch.port), "--timeout", str(REQUEST_TIMEOUT_MS)]
    argv += ["--path", str(launch.log_dir / "ipc"), "--route", ROUTE]
    if "max_wait_ms" in launch.settings:
        argv += ["--max-wait-ms", launch.settings["max_wait_ms"]]
    started.append(launch.process("mosec", argv))
    return f"http://127.0.0.1:{launch.port}{ROUTE}"
