"""Redis with a ``maxmemory`` and ``noeviction``: a write refused for memory is a clear 503 for that
request, counted, and touches nothing else; a departed worker's queue expires after the grace period
(a worker that returns removes that expiry with its next heartbeat)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from flask.testing import FlaskClient
from redis import Redis

from app import create_app
from tasks.contract import queue_name
from tests.conftest import Cluster, RedisServer, make_settings, wait_until

ROW = [1.0] * 64


def test_a_full_redis_gives_503_and_the_gateway_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # its own server: its memory limit must not touch other tests
    server.start()
    cluster = Cluster(make_settings(server), tmp_path)
    try:
        cluster.start("worker_1")
        app = create_app(cluster.settings)
        client: FlaskClient = app.test_client()
        assert client.post("/infer", json={"key": "a", "input": ROW}).status_code == 200
        redis: Redis = cluster.redis
        redis.set("ballast", b"x" * 4_000_000)
        redis.config_set("maxmemory-policy", "noeviction")
        redis.config_set("maxmemory", int(redis.info("memory")["used_memory"]) - 1_000_000)
        full = client.post("/infer", json={"key": "b", "input": ROW})
        stats = client.get("/stats").json
        assert full.status_code == 503 and "full" in full.json["error"], full.json
        assert stats["refused_for_memory_this_process"] == 1
        assert all(stats["threads_this_process"].values())
        redis.delete("ballast")
        redis.config_set("maxmemory", 0)
        assert client.post("/infer", json={"key": "c", "input": ROW}).status_code == 200
        app.extensions["ringserve"].stop()
    finally:
        cluster.close()
        server.stop()


def test_a_departed_workers_queue_expires(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory(queue_grace_s=1)
    cluster.start("worker_1", "worker_2")
    app = create_app(cluster.settings)
    client = app.test_client()
    try:
        assert client.post("/infer", json={"key": "a", "input": ROW}).status_code == 200
        redis: Redis = cluster.redis
        cluster.stop("worker_2", signal.SIGKILL)
        redis.rpush(queue_name("worker_2"), b"left-over")  # what a dead worker's queue still holds
        wait_until(lambda: redis.pttl(queue_name("worker_2")) > 0, 10, "the departed queue to get an expiry")
        wait_until(lambda: not redis.exists(queue_name("worker_2")), 10, "the departed queue to expire")
    finally:
        app.extensions["ringserve"].stop()
