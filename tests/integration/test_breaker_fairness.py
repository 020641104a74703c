"""Hostile input never hurts (issue 7): clients' impossible deadlines never open a worker's breaker.

A thousand requests that give themselves 1 µs are all answered 504, and afterwards every
worker is still in the ring: honest requests reach all three.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flask import Flask
from flask.testing import FlaskClient

from app.gateway import Gateway
from hashing.ring import Ring
from tasks.settings import Settings
from tests.conftest import Cluster, wait_until

ROW = [0.0] * 64
NODES = ("w1", "w2", "w3")
HOSTILE = 1000
THREADS = 16


def test_client_deadlines_never_open_a_breaker(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    # Workers stay members however long a busy machine delays their heartbeats: the test is about breakers,
    # and a worker that misses its heartbeats has its requests re-sent to another one (by design).
    cluster = cluster_factory(member_ttl_ms=30_000)
    cluster.start(*NODES)
    app = app_factory(cluster.settings)
    gateway: Gateway = app.extensions["ringserve"]
    gateway.ensure_started()
    router = gateway.dispatcher.router
    wait_until(lambda: set(router.members) == set(NODES), 5, f"the gateway to see {NODES}")

    ring = Ring.from_nodes(dict.fromkeys(NODES, 1.0), cluster.settings.vnodes)
    keys = [f"hostile-{i}" for i in range(HOSTILE)]
    assert Counter(ring.lookup(k) for k in keys).keys() == set(NODES)  # spread over every worker

    local = threading.local()

    def hostile(key: str) -> int:
        if not hasattr(local, "client"):
            local.client = app.test_client()
        client: FlaskClient = local.client
        return client.post("/infer", json={"key": key, "input": ROW, "timeout_ms": 0.001}).status_code

    with ThreadPoolExecutor(THREADS) as pool:
        statuses = Counter(pool.map(hostile, keys))
    print(f"hostile answers: {dict(statuses)}; open breakers: {router.open_breakers()}")
    assert statuses == {504: HOSTILE}
    assert router.open_breakers() == []

    client = app.test_client()
    landed: Counter[str] = Counter()
    for node in NODES:
        for key in [k for k in keys if ring.lookup(k) == node][:5]:
            response = client.post("/infer", json={"key": key, "input": ROW})
            assert response.status_code == 200, response.json
            assert response.json is not None
            landed[response.json["node"]] += 1
    print(f"honest answers per worker: {dict(landed)}")
    assert landed == dict.fromkeys(NODES, 5)
