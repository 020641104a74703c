"""Fixtures with real parts: a redis-server on a free port and real Celery worker processes.

Real parts only: Redis and Celery are the real programs. The redis-server binary is ``$RINGSERVE_REDIS_SERVER``
(set by ``./docker-free-run.sh test``) or the one on PATH.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from bench import procs
from bench.system import RingServe
from hashing.membership import Membership
from tasks.contract import ANNOUNCEMENTS
from tasks.settings import Settings
from tasks.worker import celery_argv

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class RedisServer:
    def __init__(self, tmp: Path, extra_args: tuple[str, ...] = ()) -> None:
        binary = os.environ.get("RINGSERVE_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise RuntimeError("no redis-server: run the tests with ./docker-free-run.sh test")
        self.binary = binary
        self.port = free_port()
        self.tmp = tmp
        self.extra_args = extra_args  # more redis-server options, e.g. a command renamed away
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
                "--databases",
                "64",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url())

        def up() -> bool:
            try:
                return bool(client.ping())
            except Exception:
                return False

        wait_until(up, 10, "redis-server to answer")
        client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL: a crash). It keeps nothing on disk: a restart starts empty."""
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


class DatabasePool:
    """Hands every cluster its own Redis database, so clusters never see each other."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next


_dbs = DatabasePool()


class Worker:
    """A real ``celery -A tasks worker`` process serving one node of the ring."""

    def __init__(self, node_id: str, settings: Settings, log_dir: Path) -> None:
        self.node_id = node_id
        self.settings = settings
        self.log_path = log_dir / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.signalled = False

    def start(self) -> None:
        env = {**os.environ, **settings_env(self.settings), "OPENBLAS_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *celery_argv(self.node_id, ["--loglevel", "INFO"])],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def begin_stop(self, sig: int = signal.SIGTERM) -> None:
        """Start stopping it (:meth:`stop` then waits, signalling no more): workers closed together
        stop in parallel."""
        if self.proc is not None and self.proc.poll() is None and not self.signalled:
            self.proc.send_signal(sig)
            self.signalled = True

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.begin_stop(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.signalled = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a worker process build the same settings."""
    return {
        "RINGSERVE_REDIS_URL": settings.redis_url,
        "RINGSERVE_MEMBER_TTL_MS": str(settings.member_ttl_ms),
        "RINGSERVE_HEARTBEAT_MS": str(settings.heartbeat_ms),
        "RINGSERVE_MAX_BATCH_SIZE": str(settings.max_batch_size),
        "RINGSERVE_MAX_DELAY_MS": str(settings.max_delay_ms),
        "RINGSERVE_BATCH_IDLE_MS": str(settings.batch_idle_ms),
        "RINGSERVE_MODEL_REPOSITORY": settings.model_repository,
        "RINGSERVE_SHARDING": str(settings.sharding),
        "RINGSERVE_SHARD_SETTLE_MS": str(settings.shard_settle_ms),
        "RINGSERVE_SHARD_GRACE_MS": str(settings.shard_grace_ms),
        "RINGSERVE_REPOSITORY_POLL_MS": str(settings.repository_poll_ms),
        "RINGSERVE_VERSION_GRACE_MS": str(settings.version_grace_ms),
    }


class Cluster:
    """Workers on one Redis database, plus helpers to watch membership."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.workers: dict[str, Worker] = {}
        self.redis = Redis.from_url(settings.redis_url)
        self.membership = Membership(self.redis, settings.member_ttl_ms, ANNOUNCEMENTS)

    def start(self, *node_ids: str) -> None:
        """Start workers and wait until each announced itself (a new run, if one was there)."""
        before = self.membership.alive()
        for node_id in node_ids:
            worker = self.workers[node_id] = Worker(node_id, self.settings, self.log_dir)
            worker.start()

        def announced(node_id: str) -> bool:
            member = self.membership.alive().get(node_id)
            return member is not None and member != before.get(node_id)

        for node_id in node_ids:
            wait_until(functools.partial(announced, node_id), 60, f"{node_id} to join the ring")

    def stop(self, node_id: str, sig: int = signal.SIGTERM) -> None:
        self.workers.pop(node_id).stop(sig)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.begin_stop()
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()
        self.redis.close()


def make_settings(redis_server: RedisServer, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": redis_server.url(_dbs.take()),
        "member_ttl_ms": 2000,
        "heartbeat_ms": 200,
        "ring_refresh_ms": 100,
        "request_timeout_ms": 15_000,
        "model_repository": str(ROOT / "models"),
        "cache": False,  # tests repeat inputs and count what reaches workers; test_cache.py turns it on
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def shared_cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two workers kept for the whole session by the tests that do not disturb them."""
    cluster = Cluster(make_settings(redis_server), tmp_path_factory.mktemp("shared-workers"))
    cluster.start("worker_a", "worker_b")
    yield cluster
    cluster.close()


@pytest.fixture
def cluster_factory(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Private clusters, on their own database, for tests that stop or kill workers."""
    made: list[Cluster] = []

    def make(**overrides: object) -> Cluster:
        cluster = Cluster(make_settings(redis_server, **overrides), tmp_path)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


class ClosedLoop:
    """Clients that each send one request after another, on threads of their own, until stopped.

    ``send(client, n, i)`` sends request ``i`` of client ``n`` and returns ``(status, node)``;
    every answer lands in ``results``.
    """

    def __init__(self, app: Flask, clients: int) -> None:
        self.app = app
        self.results: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(n,)) for n in range(clients)]

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def send(self, client: FlaskClient, n: int, i: int) -> tuple[int, str | None]:
        raise NotImplementedError

    def _loop(self, n: int) -> None:
        client = self.app.test_client()
        i = 0
        while not self._stop.is_set():
            self.results.append(self.send(client, n, i))
            i += 1

    def wait_for(self, count: int) -> None:
        start = len(self.results)
        wait_until(lambda: len(self.results) >= start + count, 60, f"{count} more answers")

    def failed(self) -> list[int]:
        return [status for status, _ in self.results if status != 200]


def kill_a_gateway_process(system: RingServe) -> Callable[[], bool]:
    """SIGKILL one of granian's two gateway processes; returns "granian has respawned it"."""
    gateway = system.pids()["gateway"]
    forks = procs.children_map().get(gateway, [])
    assert len(forks) == 2
    os.kill(forks[0], signal.SIGKILL)

    def respawned() -> bool:
        now = procs.children_map().get(gateway, [])
        return len(now) == 2 and forks[0] not in now

    return respawned

