"""The servers ringserve is measured against, started and stopped from Python.

Every peer answers ringserve's simple API (POST ``{"model", "key", "input"}`` → ``{"output"}``)
with the same model math (``bench.peers.model``), on 127.0.0.1 only, every process running
BLAS single-threaded as ringserve's workers do::

    if (reason := unavailable("mosec")) is None:
        with running_peer("mosec", "digits", workers=2, port=8100, settings={"max_wait_ms": "5"}) as peer:
            ...  # POST to peer.url; meter peer.pids

Peers: ``naive`` (Flask + one Celery task per request), ``mosec`` (Rust front, dynamic
batching), ``ray`` (Ray Serve with ``@serve.batch``). mosec and ray are optional:
``pip install -r bench/requirements-peers.txt``. Started the same way but no peer: ``floor``
(a bare Flask app answering a constant: the HTTP floor every Flask gateway stands on).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.ceiling import SINGLE_THREADED
from bench.peers import floor, mosec, naive, ray
from bench.peers.launch import Launch, Launcher
from bench.peers.model import MODEL_ENV, REPOSITORY_ENV, Signature
from bench.peers.process import PeerStartError, Process, answers, port_in_use, wait_until
from tasks.repository import Repository
from tasks.settings import Settings

__all__ = ["FLOOR", "PEERS", "PeerStartError", "RunningPeer", "running_peer", "unavailable"]

PEERS: tuple[str, ...] = ("naive", "mosec", "ray")
FLOOR = "floor"
_LAUNCHERS: dict[str, Launcher] = {"naive": naive, "mosec": mosec, "ray": ray, FLOOR: floor}


@dataclass(frozen=True)
class RunningPeer:
    """A peer that answers: the URL to POST and the root pid of each process it started, by name
    (``web``, ``celery``, ``redis``, ``mosec``…), whose trees hold everything it runs."""

    url: str
    pids: dict[str, int]


def _launcher(name: str) -> Launcher:
    if name not in _LAUNCHERS:
        raise ValueError(f"unknown peer {name!r}; known: {tuple(_LAUNCHERS)}")
    return _LAUNCHERS[name]


def unavailable(name: str) -> str | None:
    """None when peer ``name`` can run here, else a one-line reason (e.g. what to install)."""
    return _launcher(name).unavailable()


@contextmanager
def running_peer(
    name: str, model: str, workers: int, port: int, settings: Mapping[str, str] | None = None
) -> Iterator[RunningPeer]:
    """Start peer ``name`` serving ``model`` with ``workers`` processes on 127.0.0.1:``port``, tuned by
    ``settings`` (names from its launcher's SETTINGS); yield it once it has answered a request.

    Everything it started is stopped by pid on exit, also on exceptions. Logs go to a
    temporary directory, removed after a clean exit and named in every error otherwise.
    Raises PeerStartError when the peer is unavailable or does not come up.
    """
    launcher = _launcher(name)
    settings = dict(settings or {})
    if unknown := sorted(set(settings) - set(launcher.SETTINGS)):
        raise ValueError(f"peer {name} has no setting {unknown[0]!r}; it has {launcher.SETTINGS}")
    reason = launcher.unavailable()
    if reason is not None:
        raise PeerStartError(reason)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if port_in_use(port):
        raise PeerStartError(f"port {port} on 127.0.0.1 is already in use")
    repository_root = Settings.from_env().model_repository
    signature = Signature.of(Repository(repository_root), model)  # an unknown model fails here
    log_dir = Path(tempfile.mkdtemp(prefix=f"ringserve-peer-{name}-"))
    env = {**os.environ, **SINGLE_THREADED, MODEL_ENV: model, REPOSITORY_ENV: repository_root}
    launch = Launch(model, workers, port, log_dir, env, settings)
    probe = json.dumps({"model": model, "key": "ready", "input": [0.0] * signature.row_size}).encode()
    started: list[Process] = []
    try:
        url = launcher.start(launch, started)
        wait_until(lambda: answers(url, probe), launcher.READY_TIMEOUT_S, f"{name} to answer at {url}", started)
        yield RunningPeer(url, {p.name: p.pid for p in started})
    except BaseException:
        print(f"{name} peer: logs kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        for process in reversed(started):
            process.stop()
    shutil.rmtree(log_dir, ignore_errors=True)
