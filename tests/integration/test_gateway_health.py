"""A gateway whose internal thread died says so: readiness goes false and /stats names the thread."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from flask import Flask
from redis import Redis

from tasks.contract import GATEWAYS_KEY
from tasks.settings import Settings
from tests.conftest import Cluster, wait_until


def test_a_dead_thread_makes_the_gateway_unready(
    shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]
) -> None:
    app = app_factory(shared_cluster.settings)
    client = app.test_client()
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/stats").json["threads_this_process"] == {"membership": True, "replies": True, "sender": True}
    app.extensions["ringserve"].listener.stop()  # as if an unexpected error had ended it
    response = client.get("/v2/health/ready")
    assert response.status_code == 503 and "replies thread died" in response.json["error"]
    assert client.get("/v2/models/digits/ready").status_code == 503
    assert client.get("/stats").json["threads_this_process"]["replies"] is False


def test_stats_sum_rows_in_flight_over_every_gateway(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    cluster.start("w1")
    apps = [app_factory(cluster.settings) for _ in range(2)]
    redis = Redis.from_url(cluster.settings.redis_url)
    for app in apps:
        assert app.test_client().get("/v2/health/ready").status_code == 200
    worker = cluster.workers["w1"].proc
    assert worker is not None
    worker.send_signal(signal.SIGSTOP)  # requests stay in flight
    try:
        threads = [
            threading.Thread(
                target=lambda app=app, n=n: app.test_client().post(
                    "/infer", json={"key": f"k{n}", "input": [[0.0] * 64] * (n + 1), "timeout_ms": 3000}
                )
            )
            for app in apps
            for n in range(3)
        ]
        for t in threads:
            t.start()
        expected = {"w1": 2 * (1 + 2 + 3)}
        wait_until(
            lambda: apps[0].test_client().get("/stats").json["rows_in_flight_per_node"] == expected,
            5,
            "the first gateway to count the second one's rows too",
        )
        assert apps[0].test_client().get("/stats").json["rows_in_flight_per_node_this_process"] == {"w1": 6}
        routers = [app.extensions["ringserve"].dispatcher.router for app in apps]
        wait_until(lambda: [r.peers for r in routers] == [1, 1], 5, "each gateway to count the other one busy")
        redis.sadd(GATEWAYS_KEY, "gone-gateway")  # a process that reported once, and whose report expired
        wait_until(lambda: b"gone-gateway" not in redis.smembers(GATEWAYS_KEY), 5, "a load report to prune it")
        assert [r.peers for r in routers] == [1, 1]  # never counted
    finally:
        worker.send_signal(signal.SIGCONT)
    for t in threads:
        t.join()
    wait_until(
        lambda: apps[1].test_client().get("/stats").json["rows_in_flight_per_node"] == {}, 5, "the rows to drain"
    )
