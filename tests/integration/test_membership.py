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
from tasks.contract import ANNOUNCEMENTS
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
    membership = Membership(redis, ttl_ms=300, schema=ANNOUNCEMENTS)
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
    # (w2 misses its heartbeats after 0.4 s and the gateway re-sends to w1 then: either way, none is lost)
    wait_until(
        lambda: client.get("/stats").json["in_flight_this_process"] == 8 or None not in results,
        5,
        "8 requests in flight",
    )
    cluster.stop("w2", signal.SIGKILL)
    for t in threads:
        t.join(30)
    assert results == [200] * 8  # all answered, by w1, after w2's announcement expired


POISON = {
    "weight_zero": b'{"v": 2, "weight": 0, "incarnation": "a"}',
    "weight_negative": b'{"v": 2, "weight": -1, "incarnation": "a"}',
    "weight_nan": b'{"v": 2, "weight": NaN, "incarnation": "a"}',
    "weight_huge": b'{"v": 2, "weight": 1000000, "incarnation": "a"}',
    "weight_text": b'{"v": 2, "weight": "1", "incarnation": "a"}',
    "malformed": b"{not json",
    "not_a_map": b"[1, 2]",
    "old_version": b'{"weight": 1, "incarnation": "a"}',
    "no_incarnation": b'{"v": 2, "weight": 1}',
}
BAD_IDS = ["../evil", "x" * 500, "has space", ""]


def test_poisoned_announcements_are_ignored_by_every_gateway(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    cluster.start("w1", "w2")
    before = app_factory(cluster.settings).test_client()
    wait_until(lambda: gateway_members(before) == {"w1", "w2"}, 5, "the gateway to see both workers")
    for node_id, announcement in POISON.items():
        cluster.redis.sadd(ANNOUNCEMENTS.members_key, node_id)
        cluster.redis.set(ANNOUNCEMENTS.member_key(node_id), announcement, px=60_000)
    for node_id in BAD_IDS:
        cluster.redis.sadd(ANNOUNCEMENTS.members_key, node_id)
        cluster.redis.set(ANNOUNCEMENTS.member_key(node_id), POISON["weight_huge"].replace(b"1000000", b"1"))
    assert set(Membership(cluster.redis, 1000, ANNOUNCEMENTS).alive()) == {"w1", "w2"}

    after = app_factory(cluster.settings).test_client()  # a gateway started after the poison
    cluster.start("w3")  # and the first gateway still follows membership
    for client in (before, after):
        wait_until(lambda c=client: gateway_members(c) == {"w1", "w2", "w3"}, 5, "the gateway to see w3 join")
        assert client.get("/v2/health/ready").status_code == 200
        assert all(client.get("/stats").json["threads_this_process"].values())
        nodes = {client.post("/infer", json={"key": f"k{i}", "input": ROW}).json["node"] for i in range(30)}
        assert nodes == {"w1", "w2", "w3"}
