"""Workers join and leave the ring; the gateway follows and no request is lost."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from hashing.membership import Member, Membership
from hashing.ring import Ring
from tasks.settings import Settings
from tests.conftest import Cluster, RedisServer, wait_until

ROW = [1.0] * 64


def ring_of(nodes: list[str], settings: Settings) -> Ring:
    ring = Ring(settings.vnodes)
    for node in nodes:
        ring.add(node)
    return ring


def key_owned_by(node: str, ring: Ring) -> str:
    return next(k for k in (f"user-{i}" for i in range(10_000)) if ring.lookup(k) == node)


def gateway_members(client: FlaskClient) -> set[str]:
    return set(client.get("/stats").json["members"])


def test_announcements_expire_without_refresh(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url(63))
    membership = Membership(redis, ttl_ms=300)
    w1, w2 = Member(2.0, "run-1"), Member(1.0, "run-1")
    membership.announce("w1", w1)
    membership.announce("w2", w2)
    assert membership.alive() == {"w1": w1, "w2": w2}
    membership.leave("w2")
    assert membership.alive() == {"w1": w1}
    wait_until(lambda: membership.alive() == {}, 5, "the announcement to expire")
    redis.close()


def test_stopped_worker_keys_are_served_by_the_others(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    cluster.start("w1", "w2", "w3")
    client = app_factory(cluster.settings).test_client()
    wait_until(lambda: gateway_members(client) == {"w1", "w2", "w3"}, 5, "the gateway to see 3 workers")
    key = key_owned_by("w2", ring_of(["w1", "w2", "w3"], cluster.settings))
    assert client.post("/infer", json={"key": key, "input": ROW}).json["node"] == "w2"

    cluster.stop("w2")  # SIGTERM: a graceful leave
    wait_until(lambda: gateway_members(client) == {"w1", "w3"}, 5, "the gateway to drop w2")
    response = client.post("/infer", json={"key": key, "input": ROW})
    assert response.status_code == 200
    assert response.json["node"] == ring_of(["w1", "w3"], cluster.settings).lookup(key)


def test_a_join_is_visible_within_two_seconds(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    cluster.start("w1")
    client = app_factory(cluster.settings).test_client()
    wait_until(lambda: gateway_members(client) == {"w1"}, 5, "the gateway to see w1")
    cluster.start("w2")  # returns once w2 announced itself
    joined = time.monotonic()
    wait_until(lambda: gateway_members(client) == {"w1", "w2"}, 5, "the gateway to see w2")
    assert time.monotonic() - joined < 2.0
    key = key_owned_by("w2", ring_of(["w1", "w2"], cluster.settings))
    assert client.post("/infer", json={"key": key, "input": ROW}).json["node"] == "w2"


def test_requests_held_by_a_crashed_worker_are_sent_again(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory(load_factor=0)  # all 8 on the key's owner
    cluster.start("w1", "w2")
    app = app_factory(cluster.settings)
    client = app.test_client()
    wait_until(lambda: gateway_members(client) == {"w1", "w2"}, 5, "the gateway to see both workers")
    key = key_owned_by("w2", ring_of(["w1", "w2"], cluster.settings))

    victim = cluster.workers["w2"].proc
    assert victim is not None
    victim.send_signal(signal.SIGSTOP)  # frozen: requests routed to w2 now wait in its queue
    results: list[int | None] = [None] * 8

    def call(i: int) -> None:
        response = app.test_client().post("/infer", json={"key": key, "input": ROW})
        results[i] = (
            response.status_code if response.status_code != 200 else (200 if response.json["node"] == "w1" else -1)
        )

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: client.get("/stats").json["in_flight_this_process"] == 8, 5, "8 requests in flight")
    cluster.stop("w2", signal.SIGKILL)
    for t in threads:
        t.join(30)
    assert results == [200] * 8  # all answered, by w1, after w2's announcement expired
