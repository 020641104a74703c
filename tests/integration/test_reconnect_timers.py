"""A worker's timers after Redis restarts under it: batches still leave on time, one heartbeat.

Redis stops while a partial batch waits for its wake-up, and comes back. Celery's consumer
then stops its steps (ours drains what the worker holds: ``Server.stop``) and starts them
again, which calls the task's Strategy (``Server.start``) again. A lone request sent afterwards
must leave after its batch wait, not wait until its batch fills (here: until the request
timeout), and the worker must announce itself once per heartbeat, not once per heartbeat per
reconnect.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from tasks.contract import member_key
from tasks.settings import Settings
from tests.conftest import Cluster, RedisServer, make_settings, wait_until

ROW = [1.0] * 64
HOLD_MS = 1500  # a partial batch waits this long: one is waiting when Redis goes away
HEARTBEAT_MS = 200
REQUEST_TIMEOUT_MS = 8000  # what a request stuck in a partial batch would wait
WINDOW_S = 2.0


def announcements(redis: RedisServer, node_id: str, seconds: float) -> int:
    """How many times ``node_id`` refreshed its announcement in ``seconds`` (Redis MONITOR)."""
    seen = b""
    with socket.create_connection(("127.0.0.1", redis.port)) as conn:
        conn.sendall(b"MONITOR\r\n")
        conn.settimeout(0.1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                seen += conn.recv(1 << 16)
            except TimeoutError:
                continue
    return seen.lower().count(f'"set" "{member_key(node_id)}"'.encode())


def test_timers_after_a_redis_restart(tmp_path: Path, app_factory: Callable[[Settings], Flask]) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    settings = make_settings(
        redis,
        max_delay_ms=HOLD_MS,
        batch_idle_ms=HOLD_MS,
        heartbeat_ms=HEARTBEAT_MS,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    cluster = Cluster(settings, tmp_path)
    try:
        cluster.start("w1")
        app = app_factory(cluster.settings)
        client = app.test_client()
        wait_until(lambda: client.get("/v2/health/ready").status_code == 200, 10, "the gateway to be ready")
        before = announcements(redis, "w1", WINDOW_S)

        # A request the worker holds HOLD_MS; Redis goes away while it waits for its wake-up.
        held: list[int] = []
        sender = threading.Thread(target=lambda: held.append(post_status(app, "held")))
        sender.start()

        def holding() -> bool:
            stats = client.get("/stats").get_json()
            return stats["in_flight_this_process"] == 1 and stats["queue_depths"] == {"w1": 0}

        wait_until(holding, 5, "the worker to hold the request")
        redis.stop()
        time.sleep(1.0)  # the outage itself
        redis.start()
        sender.join(REQUEST_TIMEOUT_MS / 1000 + 5)
        worker = cluster.workers["w1"]
        wait_until(lambda: worker.log().count("node w1: serving") == 2, 20, "Celery to start the strategy again")
        wait_until(lambda: "w1" in cluster.membership.alive(), 10, "w1 to announce itself again")
        wait_until(lambda: client.get("/v2/health/ready").status_code == 200, 10, "the gateway to be ready again")

        # A lone request after the reconnect: a partial batch, which only its wake-up flushes.
        started = time.monotonic()
        status = post_status(app, "after")
        took_s = time.monotonic() - started
        after = announcements(redis, "w1", WINDOW_S)
        print(
            f"held request: {held}; lone request after the reconnect: {status} in {took_s * 1000:.0f} ms"
            f" (batch wait {HOLD_MS} ms); announcements per {WINDOW_S:g} s: {before} before, {after} after"
        )
        assert status == 200 and took_s < HOLD_MS / 1000 + 1.0, "a partial batch waited past its wake-up"
        assert before >= WINDOW_S / (HEARTBEAT_MS / 1000) / 2
        assert after <= before * 1.5, "the reconnect added a second heartbeat"
    finally:
        cluster.close()
        redis.stop()


def post_status(app: Flask, key: str) -> int:
    return app.test_client().post("/infer", json={"key": key, "input": ROW}).status_code
