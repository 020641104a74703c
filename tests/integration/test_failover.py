"""Scaling and failing without losing a request: join, leave, crash, restart, backpressure, breakers."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from hashing.ring import Ring
from tasks.settings import Settings
from tests.conftest import ClosedLoop, Cluster, wait_until

ROW = [1.0] * 64


def owner_key(node: str, nodes: list[str], settings: Settings, skip: int = 0) -> str:
    ring = Ring(settings.vnodes)
    for n in nodes:
        ring.add(n)
    return [k for k in (f"user-{i}" for i in range(10_000)) if ring.lookup(k) == node][skip]


def members_seen(client: FlaskClient) -> set[str]:
    return set(client.get("/stats").json["members"])


class Load(ClosedLoop):
    """Closed-loop clients posting distinct keys until stopped; every answer is recorded."""

    def __init__(self, app: Flask, clients: int = 4) -> None:
        super().__init__(app, clients)

    def send(self, client: FlaskClient, n: int, i: int) -> tuple[int, str | None]:
        response = client.post("/infer", json={"key": f"load-{n}-{i}", "input": ROW})
        return response.status_code, (response.json or {}).get("node")


def start_gateway(cluster: Cluster, app_factory: Callable[[Settings], Flask]) -> tuple[Flask, FlaskClient]:
    app = app_factory(cluster.settings)
    client = app.test_client()
    nodes = set(cluster.workers)
    wait_until(lambda: members_seen(client) == nodes, 5, f"the gateway to see {sorted(nodes)}")
    return app, client


def test_live_join_under_load_loses_nothing(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    cluster.start("w1", "w2")
    app, client = start_gateway(cluster, app_factory)
    with Load(app) as load:
        load.wait_for(100)
        cluster.start("w3")
        wait_until(lambda: members_seen(client) == {"w1", "w2", "w3"}, 2, "the join to be seen within 2 s")
        load.wait_for(200)
    statuses = Counter(s for s, _ in load.results)
    assert statuses == Counter({200: len(load.results)})
    assert "w3" in {node for _, node in load.results}


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGKILL],  # a graceful leave; a crash the ring notices when the announcement expires
    ids=["SIGTERM", "SIGKILL"],
)
def test_a_worker_leaving_under_load_loses_nothing(
    sig: int, cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    cluster.start("w1", "w2", "w3")
    app, client = start_gateway(cluster, app_factory)
    with Load(app) as load:
        load.wait_for(100)
        cluster.stop("w2", sig)
        wait_until(lambda: members_seen(client) == {"w1", "w3"}, cluster.settings.member_ttl_ms / 1000 + 2, "w2 out")
        load.wait_for(200)
    assert Counter(s for s, _ in load.results) == Counter({200: len(load.results)})


def test_restart_under_the_same_id_resends_what_the_old_run_held(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    # The restart is quicker than the ttl, and than two heartbeats (else w2 would go silent first).
    cluster = cluster_factory(member_ttl_ms=30_000, heartbeat_ms=10_000, load_factor=0)
    cluster.start("w1", "w2")
    app, client = start_gateway(cluster, app_factory)
    key = owner_key("w2", ["w1", "w2"], cluster.settings)
    old = cluster.workers["w2"].proc
    assert old is not None
    old.send_signal(signal.SIGSTOP)
    answers: list[tuple[int, str | None]] = []

    def call() -> None:
        response = app.test_client().post("/infer", json={"key": key, "input": ROW})
        answers.append((response.status_code, response.json.get("node")))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: client.get("/stats").json["in_flight_this_process"] == 6, 5, "6 requests at w2")
    cluster.stop("w2", signal.SIGKILL)
    cluster.start("w2")  # same id, new incarnation: the gateway re-sends, the new run serves
    for t in threads:
        t.join(30)
    assert answers == [(200, "w2")] * 6
    assert "discarded" in cluster.workers["w2"].log()  # the old run's messages were not executed


def test_full_worker_answers_429(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory(member_ttl_ms=30_000, max_in_flight_per_worker=2)
    cluster.start("w1")
    app, client = start_gateway(cluster, app_factory)
    worker = cluster.workers["w1"].proc
    assert worker is not None
    worker.send_signal(signal.SIGSTOP)
    statuses: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: statuses.append(app.test_client().post("/infer", json={"input": ROW}).status_code)
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: client.get("/stats").json["in_flight_this_process"] == 2, 5, "2 requests in flight")
    response = client.post("/infer", json={"input": ROW})
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert "too many requests" in response.json["error"]
    worker.send_signal(signal.SIGCONT)
    for t in threads:
        t.join(30)
    assert statuses == [200, 200]
    assert client.post("/infer", json={"input": ROW}).status_code == 200


def test_breaker_routes_around_a_sick_worker(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory(
        member_ttl_ms=30_000,
        heartbeat_ms=10_000,  # so that a frozen w2 is not seen missing its heartbeats during the test
        request_timeout_ms=300,
        breaker_failures=2,
        breaker_cooldown_ms=1000,
        load_factor=0,
    )
    cluster.start("w1", "w2")
    app, client = start_gateway(cluster, app_factory)
    key = owner_key("w2", ["w1", "w2"], cluster.settings)
    sick = cluster.workers["w2"].proc
    assert sick is not None
    sick.send_signal(signal.SIGSTOP)  # in the ring (announced for 30 s, beating every 10 s) but answering nothing
    assert [client.post("/infer", json={"key": key, "input": ROW}).status_code for _ in range(2)] == [504, 504]
    routed_around = client.post("/infer", json={"key": key, "input": ROW})
    assert routed_around.status_code == 200 and routed_around.json["node"] == "w1"
    sick.send_signal(signal.SIGCONT)
    time.sleep(1.0)  # the cooldown: then half-open, and the next success closes the breaker

    def back_on_w2() -> bool:
        response = client.post("/infer", json={"key": key, "input": ROW})
        return response.status_code == 200 and response.json["node"] == "w2"

    wait_until(back_on_w2, 5, "w2 to serve its keys again")


def test_a_worker_that_misses_its_heartbeats_is_routed_around_at_once(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    """Frozen (SIGSTOP): its announcement lasts 30 s, but two missed heartbeats (0.4 s) take it out."""
    cluster = cluster_factory(member_ttl_ms=30_000, heartbeat_ms=200, request_timeout_ms=10_000)
    cluster.start("w1", "w2")
    app, client = start_gateway(cluster, app_factory)
    key = owner_key("w2", ["w1", "w2"], cluster.settings)
    frozen = cluster.workers["w2"].proc
    assert frozen is not None
    frozen.send_signal(signal.SIGSTOP)
    try:
        sent = time.monotonic()
        held = client.post("/infer", json={"key": key, "input": ROW})  # reaches w2's queue before it is seen
        took_s = time.monotonic() - sent
        assert held.status_code == 200 and held.json["node"] == "w1"
        assert took_s < 2.0, took_s  # re-sent when w2 went silent, not when its announcement expires
        assert client.post("/infer", json={"key": key, "input": ROW}).json["node"] == "w1"
        print(f"a request held by a frozen worker was answered by another after {took_s:.2f} s")
    finally:
        frozen.send_signal(signal.SIGCONT)

    def back_on_w2() -> bool:
        response = client.post("/infer", json={"key": key, "input": ROW})
        return response.status_code == 200 and response.json["node"] == "w2"

    wait_until(back_on_w2, 5, "w2 to serve its keys again once it beats")


def test_client_deadline(client: FlaskClient) -> None:
    heavy = [[0.0] * 1024] * 32
    late = client.post("/infer", json={"model": "heavy", "input": heavy, "timeout_ms": 1})
    assert late.status_code == 504 and "1 ms" in late.json["error"]
    v2 = {"inputs": [{"name": "features", "shape": [32, 1024], "datatype": "FP32", "data": heavy}]}
    late_v2 = client.post("/v2/models/heavy/infer", json={**v2, "parameters": {"timeout": 1000}})  # µs
    assert late_v2.status_code == 504
    assert client.post("/infer", json={"input": ROW, "timeout_ms": -5}).status_code == 400
    assert client.post("/infer", json={"input": ROW, "timeout_ms": 5000}).status_code == 200


def test_worker_skips_requests_whose_deadline_passed(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    # The worker holds a lone request for 1 s (waiting for batch-mates): longer than its budget.
    cluster = cluster_factory(member_ttl_ms=30_000, max_delay_ms=1000, batch_idle_ms=1000)
    cluster.start("w1")
    app, client = start_gateway(cluster, app_factory)
    assert client.post("/infer", json={"input": ROW, "timeout_ms": 200}).status_code == 504
    wait_until(lambda: client.get("/stats").json["expired_skipped_per_node"] == {"w1": 1}, 10, "w1 to skip it")
    assert client.post("/infer", json={"input": ROW}).status_code == 200
