"""What a peer's launcher is given and must provide; see ``bench.peers.running_peer``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.peers.process import Process

ROOT = Path(__file__).resolve().parents[2]  # the repository: subprocesses run here to import bench.*


@dataclass(frozen=True)
class Launch:
    """One start of one peer: serve ``model`` with ``workers`` processes on 127.0.0.1:``port``."""

    model: str
    workers: int
    port: int
    log_dir: Path  # a fresh temporary directory: logs, sockets, Redis and Ray files
    env: Mapping[str, str]  # for every subprocess: ours plus OPENBLAS_NUM_THREADS=1 and the model

    def process(self, name: str, argv: list[str], **env: str) -> Process:
        """Start ``argv`` from the repository root with ``env`` added to :attr:`env`."""
        return Process(name, argv, self.log_dir, {**self.env, **env}, cwd=ROOT)


class Launcher(Protocol):
    """A peer module (``bench.peers.naive`` …) seen as an object."""

    READY_TIMEOUT_S: float

    def unavailable(self) -> str | None:
        """None when the peer can run here, else why not, in one line."""

    def start(self, launch: Launch, started: list[Process]) -> str:
        """Start the peer, appending each process to ``started`` as soon as it exists
        (so that a half-started peer is still stopped); return the URL to POST."""
