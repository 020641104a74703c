"""The response cache with real parts: Redis, Celery workers, gateways (each ``create_app`` is one gateway
process of its own, with its own id and threads).

A lock nobody renews stands for a leader whose process died; releasing it with its done stream, for a
leader that failed. Redis errors come from a second redis-server the cache alone uses, stopped, full
or made a read-only replica.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app.binary import HEADER
from app.cache import ENTRY_OVERHEAD_BYTES, LEASE_MS, RETRY_S, STORE, Cache, digest
from app.schemas import parse_simple
from app.submit import Lookup
from tasks.contract import (
    CACHE_BYTES_KEY,
    CACHE_ENTRY_PREFIX,
    CACHE_INDEX_KEY,
    CACHE_LOCK_PREFIX,
    CACHE_PREFIX,
    CACHE_SIZES_KEY,
    STATS_CACHE_KEY,
    cache_done_key,
    cache_entry_key,
    decode_cached,
    decode_counts,
)
from tasks.metadata import load_repository
from tasks.settings import Settings
from tests.conftest import ROOT, Cluster, RedisServer, wait_until
from tests.integration.test_sharding import body as ranker_body
from tests.integration.test_sharding import ranker_repository, wait_ready

pytestmark = pytest.mark.integration

DIGITS = load_repository(ROOT / "models")["digits"]
Apps = Callable[..., Flask]


def fresh_row() -> list[float]:
    """An input no other test sent: the shared cluster's cache lives for the whole session."""
    return np.random.default_rng().integers(0, 17, 64).astype(float).tolist()


def key_of(row: list[float]) -> str:
    """The cache digest of a one-row /infer request, from the tensors the gateway builds."""
    return digest("digits", "1", parse_simple(DIGITS, row, 32).tensors)


def infer(client: FlaskClient, row: list[float], **fields: Any) -> tuple[int, dict[str, Any]]:
    response = client.post("/infer", json={"model": "digits", "input": row, **fields})
    return response.status_code, response.json or {}


def cache_stats(client: FlaskClient) -> dict[str, Any]:
    stats = client.get("/stats")
    assert stats.status_code == 200
    return stats.json["cache"]  # type: ignore[no-any-return]


def routed(client: FlaskClient) -> int:
    return sum(client.get("/stats").json["requests_per_node"].values())


def clear(redis: Redis) -> None:
    """Forget every cache entry and count of this database."""
    keys = list(redis.scan_iter(f"{CACHE_PREFIX}*")) + [STATS_CACHE_KEY]
    redis.delete(*keys)


@pytest.fixture
def apps(shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]) -> Iterator[Apps]:
    """Gateways with the cache on, on the shared cluster, over a cache emptied first."""
    clear(shared_cluster.redis)

    def make(**overrides: Any) -> Flask:
        return app_factory(dataclasses.replace(shared_cluster.settings, **{"cache": True, **overrides}))

    yield make


def test_a_repeat_is_answered_from_the_cache_by_any_gateway_in_either_api(apps: Apps) -> None:
    one, other = apps().test_client(), apps().test_client()
    row = fresh_row()
    status, first = infer(one, row)
    assert status == 200 and first["cached"] is False
    before = routed(one)

    status, again = infer(other, row)  # another gateway process
    assert status == 200 and again["cached"] is True
    assert again["output"] == first["output"]
    assert (again["node"], again["batch_size"], again["version"]) == (first["node"], first["batch_size"], "1")

    # the same tensor through v2, outputs in binary: one entry holds every output, the route picks
    v2 = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row}]}
    response = one.post("/v2/models/digits/infer", json=v2 | {"parameters": {"binary_data_output": True}})
    assert response.status_code == 200
    size = int(response.headers[HEADER])
    head = json.loads(response.data[:size])
    assert head["parameters"]["cached"] is True
    np.testing.assert_array_equal(np.frombuffer(response.data[size:], "<f4"), np.float32(first["output"]))
    response = one.post("/v2/models/digits/infer", json=v2 | {"outputs": [{"name": "probabilities"}]})
    assert response.json["parameters"]["cached"] is True
    assert response.json["outputs"][0]["data"] == first["output"]

    assert routed(one) == before  # hits reach no worker
    stats = cache_stats(one)  # a repeat that came before the answer was stored waited for it: "coalesced"
    assert (stats["hits"] + stats["coalesced"], stats["misses"]) == (3, 1)
    assert stats["entries"] == 1 and stats["bytes"] > 0


def test_off_for_a_model_whose_config_says_so_and_off_altogether(apps: Apps, tmp_path: Path) -> None:
    config = json.loads((ROOT / "models" / "digits" / "config.json").read_text())
    (tmp_path / "digits" / "1").mkdir(parents=True)  # the gateway reads the config alone
    (tmp_path / "digits" / "config.json").write_text(json.dumps(config | {"response_cache": False}))
    row = fresh_row()
    for app in (apps(model_repository=str(tmp_path)), apps(cache=False)):
        client = app.test_client()
        assert [infer(client, row)[1]["cached"] for _ in range(2)] == [False, False]
    assert apps(cache=False).test_client().get("/stats").json["cache"] == {"enabled": False}
    assert cache_stats(apps().test_client())["entries"] == 0


def test_only_answers_are_cached_never_errors(apps: Apps, shared_cluster: Cluster) -> None:
    client = apps().test_client()
    row = fresh_row()
    status, _ = infer(client, row, timeout_ms=0.001)  # its deadline passes before the sender takes it
    assert status == 504 and cache_stats(client)["misses"] == 0  # so it was never looked up
    late = fresh_row()
    shared_cluster.redis.set(cache_entry_key(key_of(late)), CACHE_LOCK_PREFIX + b"elsewhere:1", px=LEASE_MS // 2)
    status, _ = infer(client, late, timeout_ms=LEASE_MS / 4)  # it waits for another's computation, in vain
    assert status == 504
    assert [infer(client, r)[1]["cached"] for r in (row, row, late, late)] == [False, True, False, True]
    stats = cache_stats(client)  # a repeat may have come before the answer was stored: then it waited for it
    assert (stats["hits"] + stats["coalesced"], stats["misses"]) == (2, 2)
    assert cache_stats(client)["errors_this_process"] == 0


def test_identical_requests_in_flight_are_computed_once_across_gateways(apps: Apps, shared_cluster: Cluster) -> None:
    """Six identical requests over two gateways wait while another process holds the lock; when that leader
    fails, one of them computes and the others get its answer."""
    gateways = [apps(), apps()]
    row = fresh_row()
    redis = shared_cluster.redis
    redis.set(cache_entry_key(key_of(row)), CACHE_LOCK_PREFIX + b"elsewhere:1", px=60_000)
    before = routed(gateways[0].test_client())
    answers: list[tuple[int, dict[str, Any]]] = []

    def send(app: Flask) -> None:
        answers.append(infer(app.test_client(), row))

    threads = [threading.Thread(target=send, args=(app,)) for app in gateways * 3]
    for t in threads:
        t.start()
    waiting = [app.extensions["ringserve"].cache for app in gateways]
    wait_until(lambda: sum(c.waiting for c in waiting) == 6, 10, "six requests waiting for the computation")
    redis.delete(cache_entry_key(key_of(row)))  # the other process's leader failed: it gives up its lock
    redis.xadd(cache_done_key("elsewhere:1"), {"stored": "0"})
    released = time.monotonic()
    for t in threads:
        t.join(30)
    # woken by the new leader's announcement, not by a lease running out
    assert time.monotonic() - released < LEASE_MS / 1000
    assert [status for status, _ in answers] == [200] * 6
    assert sorted(a["cached"] for _, a in answers) == [False] + [True] * 5
    assert len({tuple(a["output"]) for _, a in answers}) == 1
    assert routed(gateways[0].test_client()) == before + 1  # computed once

    def counted() -> tuple[int, int]:  # joins in one process are counted by its writer, a moment later
        stats = cache_stats(gateways[0].test_client())
        return stats["misses"], stats["coalesced"] + stats["hits"]

    wait_until(lambda: counted() == (1, 5), 5, "one miss and five answers from it counted")


def test_a_leader_that_died_is_taken_over_after_its_lease(apps: Apps, shared_cluster: Cluster) -> None:
    client = apps().test_client()
    row = fresh_row()
    shared_cluster.redis.set(cache_entry_key(key_of(row)), CACHE_LOCK_PREFIX + b"dead:1", px=LEASE_MS // 2)
    start = time.monotonic()
    status, answer = infer(client, row)
    took = time.monotonic() - start
    assert status == 200 and answer["cached"] is False
    # it waited for the lock to expire, looked again within a lease, and computed itself: no Redis error
    assert LEASE_MS / 2000 <= took < LEASE_MS / 1000 + 0.5
    assert cache_stats(client)["errors_this_process"] == 0


def test_garbage_in_the_cache_is_a_miss_and_is_replaced(apps: Apps, shared_cluster: Cluster) -> None:
    client = apps().test_client()
    redis = shared_cluster.redis
    row = fresh_row()
    redis.set(cache_entry_key(key_of(row)), b"\x92\xa7garbage\x01", px=60_000)
    assert [infer(client, row)[1]["cached"] for _ in range(2)] == [False, True]
    decode_cached(redis.get(cache_entry_key(key_of(row))), "x")  # the answer replaced the garbage
    stats = cache_stats(client)
    assert (stats["hits"] + stats["coalesced"], stats["misses"]) == (1, 1)

    odd = fresh_row()  # a "lock" too long to name a token: computed without the cache, answered
    redis.set(cache_entry_key(key_of(odd)), CACHE_LOCK_PREFIX + b"x" * 300, px=60_000)
    assert [infer(client, odd)[1]["cached"] for _ in range(2)] == [False, False]

    # bookkeeping Redis refuses to run the store script on: answered all the same, cached again once fixed
    redis.set(CACHE_INDEX_KEY, b"not a sorted set")
    redis.set(CACHE_BYTES_KEY, b"junk")
    third = fresh_row()
    assert [infer(client, third)[0] for _ in range(3)] == [200] * 3
    redis.delete(CACHE_INDEX_KEY)
    time.sleep(RETRY_S)  # the writer's error made this process leave the cache alone for a while
    wait_until(lambda: infer(client, third)[1]["cached"], 5, "the answer to be stored")


def test_the_budget_evicts_the_oldest_and_the_ttl_expires_entries(apps: Apps) -> None:
    row0 = fresh_row()
    client = apps().test_client()
    infer(client, row0)
    wait_until(lambda: cache_stats(client)["entries"] == 1, 5, "the first answer to be stored")
    entry = cache_stats(client)["bytes"]  # every digits answer counts the same bytes
    budget = 10 * entry + entry // 2
    client = apps(cache_max_bytes=budget, cache_ttl_s=60).test_client()
    rows = [fresh_row() for _ in range(30)]
    for row in rows:
        assert infer(client, row)[0] == 200
    wait_until(lambda: cache_stats(client)["entries"] == 10, 5, "the cache to hold ten answers")
    stats = cache_stats(client)
    assert stats["bytes"] == 10 * entry <= budget
    hits = [infer(client, row)[1]["cached"] for row in (rows[29], rows[20])]  # newest first: a miss stores
    assert hits + [infer(client, row)[1]["cached"] for row in (rows[19], rows[0], row0)] == [True, True] + [False] * 3

    # The TTL, on its own (a short one, so that the budget above never depends on how fast this machine is).
    client = apps(cache_max_bytes=budget, cache_ttl_s=1).test_client()
    row = fresh_row()
    infer(client, row)
    wait_until(lambda: infer(client, row)[1]["cached"], 5, "the answer to be stored")
    time.sleep(1.1)  # past the TTL: the entry expired
    assert infer(client, row)[1]["cached"] is False


def test_the_counted_bytes_bound_what_redis_holds(shared_cluster: Cluster) -> None:
    """ENTRY_OVERHEAD_BYTES covers what Redis spends per entry beyond its value and key (digits-sized answers)."""
    redis = shared_cluster.redis
    clear(redis)
    blob = b"x" * 120
    entries = 2_000
    before = int(redis.info("memory")["used_memory"])
    for start in range(0, entries, 200):
        keys, args = [CACHE_INDEX_KEY, CACHE_SIZES_KEY, CACHE_BYTES_KEY], []
        for i in range(start, start + 200):
            d = f"{i:064x}"
            keys += [cache_entry_key(d), f"{CACHE_PREFIX}waiting:t{i}", f"{CACHE_PREFIX}done:t{i}"]
            args += [d, blob]
        redis.eval(
            STORE, len(keys), *keys, 60_000, 10**9, LEASE_MS, CACHE_ENTRY_PREFIX, ENTRY_OVERHEAD_BYTES, 64, 1000, *args
        )  # type: ignore[no-untyped-call]
    used = int(redis.info("memory")["used_memory"]) - before
    counted = int(redis.get(CACHE_BYTES_KEY) or 0)
    assert counted == entries * (len(blob) + len(cache_entry_key("0" * 64)) + ENTRY_OVERHEAD_BYTES)
    assert used <= counted, (
        f"Redis used {used / entries:.0f} bytes per entry, the budget counts {counted / entries:.0f}"
    )
    clear(redis)


@pytest.fixture
def cache_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("cache-redis"))
    server.start()
    yield server
    server.stop()


def break_redis(server: RedisServer, how: str) -> Callable[[], None]:
    """Make the cache's Redis fail as ``how`` says; returns what mends it."""
    admin = Redis.from_url(server.url())
    if how == "down":
        server.stop()
        return server.start
    if how == "full":
        admin.config_set("maxmemory", 1)
        return lambda: admin.config_set("maxmemory", 0) and None
    admin.replicaof("127.0.0.1", 1)  # a replica of nobody: read-only
    return lambda: admin.replicaof("NO", "ONE") and None


@pytest.mark.parametrize("how", ["down", "full", "read-only"])
def test_a_redis_error_in_the_cache_is_a_miss(apps: Apps, cache_server: RedisServer, how: str) -> None:
    client = apps(cache_redis_url=cache_server.url()).test_client()
    row = fresh_row()
    assert [infer(client, row)[1]["cached"] for _ in range(2)] == [False, True]
    mend = break_redis(cache_server, how)
    other = fresh_row()
    for r in (row, other, other, row):
        status, answer = infer(client, r)
        assert status == 200 and answer["cached"] is False
    stats = client.get("/stats")
    assert stats.status_code == 200 and stats.json["cache"]["errors_this_process"] >= 1
    mend()
    time.sleep(RETRY_S)
    infer(client, other)
    wait_until(lambda: infer(client, other)[1]["cached"], 5, "the cache to answer again")


def test_a_sharded_model_caches_the_gathered_result(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], tmp_path: Path
) -> None:
    repository = ranker_repository(tmp_path / "models", 2_000)
    cluster = cluster_factory(model_repository=str(repository), cache=True)
    cluster.start("s1", "s2")
    client = app_factory(cluster.settings).test_client()
    wait_ready(client, {"s1", "s2"})
    ids = list(range(0, 2_000, 100))  # rows of both workers
    features = np.random.default_rng(3).standard_normal((len(ids), 16), dtype=np.float32)
    answers = [client.post("/v2/models/ranker/infer", json=ranker_body(ids, features)).json for _ in range(2)]
    assert [a["parameters"]["cached"] for a in answers] == [False, True]
    assert answers[0]["parameters"]["node"] == answers[1]["parameters"]["node"] == "s1,s2"
    assert answers[0]["outputs"] == answers[1]["outputs"]
    assert sum(client.get("/stats").json["requests_per_node"].values()) == 2  # two parts, once


def test_the_sender_looks_up_a_cycles_requests_in_one_round_trip_before_sending_them(
    apps: Apps, shared_cluster: Cluster
) -> None:
    """While the sender makes one lookup, 19 more requests queue: its next cycle looks them all up in one
    script call. Misses are sent and computed; the same rows again are answered from the cache, unsent."""
    app = apps()
    client = app.test_client()
    assert infer(client, fresh_row())[1]["cached"] is False  # the gateway's threads run
    dispatcher = app.extensions["ringserve"].dispatcher
    look, batches, hold = dispatcher.look, [], threading.Event()

    def held(lookups: list[Lookup]) -> None:
        batches.append(len(lookups))
        hold.wait(10)
        look(lookups)

    dispatcher.look = held
    rows = [fresh_row() for _ in range(20)]
    answers: dict[int, bool] = {}

    def send(i: int) -> None:
        status, answer = infer(app.test_client(), rows[i])
        assert status == 200
        answers[i] = answer["cached"]

    before = routed(client)
    first = threading.Thread(target=send, args=(0,))
    first.start()
    wait_until(lambda: batches == [1], 10, "the sender to look up the first request")
    threads = [threading.Thread(target=send, args=(i,)) for i in range(1, 20)]
    for t in threads:
        t.start()
    wait_until(lambda: dispatcher._outbox.qsize() == 19, 10, "19 requests queued behind the lookup")
    hold.set()
    for t in [first, *threads]:
        t.join(30)
    assert batches == [1, 19] and answers == dict.fromkeys(range(20), False)
    assert routed(client) == before + 20
    for i in range(20):  # one at a time now: hits end in the sender, unsent
        send(i)
    assert answers == dict.fromkeys(range(20), True) and routed(client) == before + 20
    assert cache_stats(client)["errors_this_process"] == 0


def test_a_lookup_that_fails_is_a_miss_and_the_sender_lives_on(apps: Apps) -> None:
    app = apps()
    client = app.test_client()
    gateway = app.extensions["ringserve"]
    assert infer(client, fresh_row())[0] == 200

    def broken(lookups: list[Lookup]) -> None:
        raise RuntimeError("a bug")

    gateway.dispatcher.look = broken
    before = routed(client)
    status, answer = infer(client, fresh_row())
    assert status == 200 and answer["cached"] is False and routed(client) == before + 1  # computed
    assert gateway.cache.errors == 1 and gateway.dispatcher.alive
    assert client.get("/v2/health/ready").status_code == 200


def test_one_script_call_looks_up_a_cycle_counting_hits_and_misses(shared_cluster: Cluster) -> None:
    """An answer is found and counted a hit, another's lock is found and counted nothing, an empty entry
    takes our lock (with its lease) and counts a miss; the counters get what every lookup added."""
    redis = shared_cluster.redis
    clear(redis)
    answer, theirs = b"\x81\xa1v\x01", CACHE_LOCK_PREFIX + b"other:1"
    redis.set(cache_entry_key("a" * 64), answer)
    redis.set(cache_entry_key("b" * 64), theirs)
    cache = Cache(redis, ttl_s=60, max_bytes=10**6, owner="test")
    mine = [CACHE_LOCK_PREFIX + f"test:{i}".encode() for i in range(4)]
    lookups = [Lookup("a" * 64, mine[0], "hits"), Lookup("b" * 64, mine[1], "hits")]
    lookups += [Lookup("c" * 64, mine[2], "hits"), Lookup("a" * 64, mine[3], "coalesced")]
    cache.look(lookups)
    assert [lookup.found for lookup in lookups] == [answer, theirs, None, answer]
    assert [lookup.error for lookup in lookups] == [None] * 4
    assert redis.get(cache_entry_key("c" * 64)) == mine[2] and 0 < redis.pttl(cache_entry_key("c" * 64)) <= LEASE_MS
    assert redis.get(cache_entry_key("b" * 64)) == theirs  # another's lock stays
    assert decode_counts(redis.hgetall(STATS_CACHE_KEY)) == {"hits": 1, "coalesced": 1, "misses": 1}
    redis.script_flush()  # as after a restart: the script is loaded again, once
    cache.look([Lookup("d" * 64, mine[0], "hits")])
    assert redis.get(cache_entry_key("d" * 64)) == mine[0]
    clear(redis)
