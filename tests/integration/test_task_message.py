"""The gateway writes task messages itself (``tasks.contract.encode_task_message``): they must be what
Celery and kombu write for the same task, so that any ``celery worker``, Flower and ``celery inspect``
read them as their own."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgpack
from kombu import Connection
from redis import Redis

from tasks.celery_app import make_celery
from tasks.contract import (
    TASK_NAME,
    Item,
    Tensor,
    decode_replies,
    encode_envelope,
    encode_task_message,
    queue_name,
    reply_key,
)
from tasks.transport import transport_for
from tests.conftest import Cluster, RedisServer, make_settings, wait_until

ITEM = {"id": "a", "inputs": [["x", "FP32", [1, 1], b"\0" * 4]]}
ENVELOPE = {"v": 2, "reply_to": "ringserve:reply:g", "items": [ITEM]}
IDS = {("headers", "id"), ("headers", "root_id"), ("headers", "origin"), ("properties", "correlation_id"),
       ("properties", "delivery_tag")}  # fmt: skip


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if k != "body"}
    for section, name in IDS:
        out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def test_our_message_is_celerys_message(redis_server: RedisServer) -> None:
    settings = make_settings(redis_server)
    celery = make_celery(settings)
    redis = Redis.from_url(settings.redis_url)
    queue = queue_name("node_a")
    try:
        # Celery's own path to the same message: build it (task protocol 2), publish it with kombu
        message = celery.amqp.as_task_v2("id", TASK_NAME, args=[ENVELOPE], argsrepr="", kwargsrepr="")
        with celery.producer_or_acquire() as producer:
            producer.publish(message.body, exchange="", routing_key=queue, serializer="msgpack",
                             headers=message.headers, **message.properties)  # fmt: skip
        redis.lpush(queue, encode_task_message(queue, ENVELOPE, "gen1@host"))
        ours, celerys = (json.loads(raw) for raw in redis.lrange(queue, 0, -1))  # LPUSH: newest first
    finally:
        redis.delete(queue)
        redis.close()
        celery.close()
    assert without_ids(ours) == without_ids(celerys)
    assert msgpack.unpackb(base64.b64decode(ours["body"])) == msgpack.unpackb(base64.b64decode(celerys["body"]))
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    assert ours["headers"]["id"] != ours["properties"]["delivery_tag"]


def bulk_pops(tmp_path: Path, redis_config: tuple[str, ...] = ()) -> dict[str, int]:
    """200 messages waiting, garbage among them: the worker answers all 200; the pops it took, by command."""
    server = RedisServer(tmp_path, extra_args=redis_config)  # its own server: command statistics count every client's
    server.start()
    cluster = Cluster(make_settings(server), tmp_path)
    try:
        cluster.start("worker_1")
        redis = cluster.redis
        queue, replies = queue_name("worker_1"), reply_key("bulk-test")
        row = Tensor("input", "FP32", (1, 64), b"\0" * 256)
        messages = [
            encode_task_message(queue, encode_envelope(replies, [Item(f"r{i}", "digits", "1", 60_000.0, (row,))]), "t")
            for i in range(200)
        ]
        messages.insert(100, b"not json")
        redis.config_resetstat()
        redis.lpush(queue, *messages)

        def answered() -> int:
            return sum(len(decode_replies(blob)[0]) for blob in redis.lrange(replies, 0, -1))

        wait_until(lambda: answered() == 200, 60, "the worker to answer all 200 requests")
        stats = redis.info("commandstats")
        pops = {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("blmpop", "brpop", "rpop")}
        print(f"200 messages: {pops}")
        return pops
    finally:
        cluster.close()
        server.stop()


def test_a_worker_pops_waiting_messages_in_bulk(tmp_path: Path) -> None:
    """One BLMPOP takes up to 32 waiting messages: 201 are taken in a handful, none with BRPOP or RPOP."""
    pops = bulk_pops(tmp_path)
    assert 7 <= pops["blmpop"] <= 50 and pops["brpop"] == pops["rpop"] == 0


def test_without_blmpop_a_worker_pops_with_brpop_then_rpop(tmp_path: Path) -> None:
    """A Redis without BLMPOP (before 7.0; here the command is renamed away): after one refusal the worker
    pops one message per BRPOP and what else waits with RPOP, and still answers everything."""
    pops = bulk_pops(tmp_path, ("--rename-command", "BLMPOP", ""))
    assert pops["rpop"] >= 1 and 1 <= pops["brpop"] <= 50


def test_a_channel_sends_its_own_commands_through_one_client(redis_server: RedisServer) -> None:
    """kombu would build a redis-py client (56 µs) for every command a channel sends outside its event loop:
    the RPOP after each BRPOP, each task event published. Ours reuses one, on the channel's pool."""
    url = make_settings(redis_server).redis_url
    with Connection(url, transport=transport_for(url)) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.connection_pool is channel.pool
            assert first.ping()
        given = Redis.from_url(url)
        with channel.conn_or_acquire(given) as passed:
            assert passed is given  # a client the caller brings is used as it is
        given.close()
