"""The naive peer: the seed's design written plainly.

Flask under granian; each request sends one Celery task through its own redis-server
(broker and result backend) and blocks on ``AsyncResult.get``; one prefork Celery worker
with ``workers`` processes on the default queue. No batching, no routing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from bench.peers.launch import Launch, granian_argv, granian_unavailable
from bench.peers.process import Process, free_port, wait_until

READY_TIMEOUT_S = 60.0
SETTINGS: tuple[str, ...] = ()
REDIS_URL_ENV = "RINGSERVE_PEER_REDIS_URL"  # read by naive.tasks in the worker and web processes


def redis_server_binary() -> str | None:
    """redis-server on PATH, else ``$RINGSERVE_REDIS_SERVER``, else the one in the venv's bin."""
    venv_binary = Path(sys.executable).parent / "redis-server"
    for candidate in (shutil.which("redis-server"), os.environ.get("RINGSERVE_REDIS_SERVER"), str(venv_binary)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable() -> str | None:
    if redis_server_binary() is None:
        return "naive needs redis-server: put it on PATH or set RINGSERVE_REDIS_SERVER"
    return granian_unavailable()


def _start_redis(launch: Launch, started: list[Process]) -> str:
    port = free_port()
    binary = redis_server_binary() or "redis-server"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis = launch.process("redis", [*argv, "--dir", str(launch.log_dir), "--maxclients", "10000"])
    started.append(redis)
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url, socket_timeout=1)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except RedisError:
            return False

    try:
        wait_until(answers, 10.0, f"redis-server on port {port}", started)
    finally:
        client.close()
    return url


def start(launch: Launch, started: list[Process]) -> str:
    redis_url = _start_redis(launch, started)
    celery = [sys.executable, "-m", "celery", "-A", "bench.peers.naive.tasks", "worker", "-n", "naive@%h"]
    options = ["--concurrency", str(launch.workers), "--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    started.append(launch.process("celery", [*celery, *options], **{REDIS_URL_ENV: redis_url}))
    web = granian_argv("bench.peers.naive.web:app", launch.port)
    started.append(launch.process("web", web, **{REDIS_URL_ENV: redis_url}))
    return f"http://127.0.0.1:{launch.port}/infer"
