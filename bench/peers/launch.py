"""What a peer's launcher is given and must provide; see ``bench.peers.running_peer``."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench.peers.process import Process

ROOT = Path(__file__).resolve().parents[2]  # the repository: subprocesses run here to import bench.*
WEB_PROCESSES = 2  # as ringserve's gateway in docker-free-run.sh: granian --workers 2 --blocking-threads 32
WEB_THREADS = 32


@dataclass(frozen=True)
class Launch:
    """One start of one peer: serve ``model`` with ``workers`` processes on 127.0.0.1:``port``."""

    model: str
    workers: int
    port: int
    log_dir: Path  # a fresh temporary directory: logs, sockets, Redis and Ray files
    env: Mapping[str, str]  # for every subprocess: ours plus single-threaded BLAS and the model
    settings: Mapping[str, str] = field(default_factory=dict)  # the peer's own knobs, names in its SETTINGS

    def process(self, name: str, argv: list[str], **env: str) -> Process:
        """Start ``argv`` from the repository root with ``env`` added to :attr:`env`."""
        return Process(name, argv, self.log_dir, {**self.env, **env}, cwd=ROOT)


def granian_unavailable() -> str | None:
    """None when granian (the WSGI server of ringserve's gateway) can run here, else what to install."""
    if importlib.util.find_spec("granian") is None:
        return "granian is not installed: pip install -r requirements.txt"
    return None


def granian_argv(app: str, port: int) -> list[str]:
    """A WSGI ``module:app`` under granian with ringserve's gateway settings (docker-free-run.sh), so that
    a Flask peer and the floor pay for the same HTTP server as ringserve does."""
    argv = [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port)]
    return [*argv, "--workers", str(WEB_PROCESSES), "--blocking-threads", str(WEB_THREADS), "--no-access-log", app]


class Launcher(Protocol):
    """A peer module (``bench.peers.naive`` …) seen as an object."""

    READY_TIMEOUT_S: float
    SETTINGS: tuple[str, ...]  # the names :attr:`Launch.settings` may hold for this peer

    def unavailable(self) -> str | None:
        """None when the peer can run here, else why not, in one line."""

    def start(self, launch: Launch, started: list[Process]) -> str:
        """Start the peer, appending each process to ``started`` as soon as it exists
        (so that a half-started peer is still stopped); return the URL to POST."""
