"""The floor: a bare Flask app under granian with ringserve's gateway settings, answering a constant.

No model, no queue, no Redis: it parses ringserve's ``/infer`` body with orjson, as the gateway does,
and answers the same constant JSON every time. What it costs per request is what any Flask gateway
under this WSGI server costs on this machine before it does any work of its own, so ringserve's
gateway reads as floor + its own part. ``workers`` is ignored: the HTTP server is the whole floor.
"""

from __future__ import annotations

from bench.peers.launch import Launch, granian_argv, granian_unavailable
from bench.peers.process import Process

READY_TIMEOUT_S = 30.0
SETTINGS: tuple[str, ...] = ()
ROUTE = "/infer"


def unavailable() -> str | None:
    return granian_unavailable()


def start(launch: Launch, started: list[Process]) -> str:
    started.append(launch.process("web", granian_argv("bench.peers.floor.web:app", launch.port)))
    return f"http://127.0.0.1:{launch.port}{ROUTE}"
