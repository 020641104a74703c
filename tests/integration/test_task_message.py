"""The gateway writes task messages itself (``tasks.contract.encode_task_message``): they must be what
Celery and kombu write for the same task, so that any ``celery worker``, Flower and ``celery inspect``
read them as their own."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
from redis import Redis

from tasks.celery_app import make_celery
from tasks.contract import TASK_NAME, encode_task_message, queue_name
from tests.conftest import RedisServer, make_settings

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
