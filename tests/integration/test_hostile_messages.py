"""Garbage on the queues never hurts: a hostile-message corpus against a whole live system.

The system is started by ``./docker-free-run.sh`` (granian gateway, Celery workers, Redis).
Every kind of garbage below is pushed straight onto every worker's queue and onto the
gateway's reply list while valid requests run alongside. The same processes (same pids, none
restarted) keep serving, every valid request gets 200, and what was dropped is counted.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from redis import Redis

from bench.system import RingServe
from tasks.celery_app import make_celery
from tasks.contract import CONTRACT_VERSION, KEY_PREFIX, TASK_NAME, queue_name
from tasks.settings import Settings
from tests.conftest import wait_until

ROW = [0.5] * 64
PIXELS = ["pixels", "FP32", [1, 64], b"\0" * 256]
HUGE = 5 * 1024 * 1024


def item(**overrides: Any) -> dict[str, Any]:
    base = {"id": "hostile-1", "model": "digits", "version": "1", "budget_ms": 5000.0, "inputs": [PIXELS]}
    return {**base, **overrides}


def envelope(reply_to: str, **overrides: Any) -> dict[str, Any]:
    return {"v": CONTRACT_VERSION, "reply_to": reply_to, "items": [item()], **overrides}


class Queues:
    """Writes to the system's Redis as a hostile neighbour would: raw, or as Celery messages."""

    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.celery = make_celery(Settings(redis_url=redis_url))
        self.template = self._kombu_template()

    def raw(self, queue: str, payload: bytes) -> None:
        self.redis.lpush(queue, payload)

    def kombu(self, queue: str, **changes: Any) -> None:
        """A kombu message (JSON, as kombu's Redis transport stores it), with ``changes``."""
        self.raw(queue, json.dumps({**self.template, **changes}).encode())

    def task(self, queue: str, args: Any, serializer: str = "msgpack") -> None:
        """A well-formed Celery message of our task whose argument list is ``args``."""
        message = self.celery.amqp.as_task_v2("hostile", TASK_NAME, args=args)
        with self.celery.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                routing_key=queue,
                exchange="",
                serializer=serializer,
                headers=message.headers,
                retry=False,
                **message.properties,
            )

    def task_bytes(self, queue: str, body: bytes, content_type: str) -> None:
        """A Celery message of our task whose body is ``body``, declared as ``content_type``."""
        message = self.celery.amqp.as_task_v2("hostile", TASK_NAME, args=[])
        with self.celery.producer_or_acquire() as producer:
            producer.publish(
                body,
                routing_key=queue,
                exchange="",
                content_type=content_type,
                content_encoding="binary",
                headers=message.headers,
                retry=False,
                **message.properties,
            )

    def _kombu_template(self) -> dict[str, Any]:
        scratch = queue_name("scratch")
        self.task(scratch, [envelope(KEY_PREFIX + "reply:nobody")])
        raw = self.redis.rpop(scratch)
        assert isinstance(raw, bytes)
        return json.loads(raw)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.celery.close()
        self.redis.close()


# Each kind: (name, how many messages or requests the worker drops for it, how to push it).
# The kinds that drop none are valid envelopes whose bad item has an id: it is answered 400
# or 404 to the sender on its own (here nobody waits for it, and the gateway ignores it).
Push = Callable[[Queues, str, str], None]
WORKER_CORPUS: list[tuple[str, int, Push]] = [
    ("raw bytes", 1, lambda q, queue, reply: q.raw(queue, b"\x00\x01garbage\xff")),
    ("invalid UTF-8", 1, lambda q, queue, reply: q.raw(queue, b"\xff\xfe\xfd")),
    ("empty", 1, lambda q, queue, reply: q.raw(queue, b"")),
    ("JSON number", 1, lambda q, queue, reply: q.raw(queue, b"42")),
    ("JSON list", 1, lambda q, queue, reply: q.raw(queue, b"[1, 2, 3]")),
    ("JSON, not a kombu message", 1, lambda q, queue, reply: q.raw(queue, b'{"hello": "world"}')),
    ("huge garbage body", 1, lambda q, queue, reply: q.raw(queue, b"x" * HUGE)),
    ("kombu message without properties", 1, lambda q, queue, reply: q.kombu(queue, properties=None)),
    ("kombu message, delivery tag missing", 1, lambda q, queue, reply: q.kombu(queue, properties={})),
    ("kombu message, body not base64", 1, lambda q, queue, reply: q.kombu(queue, body="***not base64***")),
    ("headers not a map", 1, lambda q, queue, reply: q.kombu(queue, headers="task")),
    ("task name not a string", 1, lambda q, queue, reply: q.kombu(queue, headers={"task": ["x"]})),
    ("unknown task", 1, lambda q, queue, reply: q.kombu(queue, headers={**q.template["headers"], "task": "evil"})),
    ("wrong serializer (pickle)", 1, lambda q, queue, reply: q.task_bytes(queue, b"\x80\x04K\x01.", "application/x-python-serialize")),  # noqa: E501
    ("truncated msgpack", 1, lambda q, queue, reply: q.task_bytes(queue, msgpack.packb([[1], {}, {}])[:-3], "application/x-msgpack")),  # noqa: E501
    ("JSON body, args not a list", 1, lambda q, queue, reply: q.task_bytes(queue, b'["no args", {}, {}]', "application/json")),  # noqa: E501
    ("no envelope", 1, lambda q, queue, reply: q.task(queue, [])),
    ("envelope not a map", 1, lambda q, queue, reply: q.task(queue, [[1, 2]])),
    ("missing reply_to", 1, lambda q, queue, reply: q.task(queue, [{"v": CONTRACT_VERSION, "items": [item()]}])),
    ("reply_to not a reply list", 1, lambda q, queue, reply: q.task(queue, [envelope(KEY_PREFIX + "members")])),
    ("wrong contract version", 1, lambda q, queue, reply: q.task(queue, [envelope(reply, v=1)])),
    ("items not a list", 1, lambda q, queue, reply: q.task(queue, [envelope(reply, items={"a": 1})])),
    ("items that are not maps, no id", 2, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[1, "x"])])),
    ("non-numeric deadline", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(budget_ms="soon")])])),  # noqa: E501
    ("NaN deadline", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(budget_ms=float("nan"))])])),  # noqa: E501
    ("tensor data of the wrong size", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(inputs=[["pixels", "FP32", [1, 64], b"\0"]])])])),  # noqa: E501
    ("unknown datatype", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(inputs=[["pixels", "FP128", [1, 64], b""]])])])),  # noqa: E501
    ("absurd shape", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(inputs=[["pixels", "FP32", [10**12, 64], b""]])])])),  # noqa: E501
    ("wrong input name", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(inputs=[["image", "FP32", [1, 64], b"\0" * 256]])])])),  # noqa: E501
    ("too many rows for a batch", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(inputs=[["pixels", "FP32", [99, 64], b"\0" * 256 * 99]])])])),  # noqa: E501
    ("unknown model", 0, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(model="nope")])])),
    ("item id not a string", 1, lambda q, queue, reply: q.task(queue, [envelope(reply, items=[item(id=["x"], budget_ms=None)])])),  # noqa: E501
]

REPLY_CORPUS: list[tuple[str, bytes]] = [
    ("raw bytes", b"\x00garbage\xff"),
    ("empty", b""),
    ("truncated msgpack", msgpack.packb({"v": CONTRACT_VERSION, "replies": [{"id": "x"}]})[:-2]),
    ("a list (no version)", msgpack.packb([{"id": "x", "node": "w"}])),
    ("wrong contract version", msgpack.packb({"v": 1, "replies": []})),
    ("replies not a list", msgpack.packb({"v": CONTRACT_VERSION, "replies": 7})),
    ("a reply that is not a map", msgpack.packb({"v": CONTRACT_VERSION, "replies": [3]})),
    ("id not a string", msgpack.packb({"v": CONTRACT_VERSION, "replies": [{"id": 1, "node": "w", "error": "expired", "message": ""}]})),  # noqa: E501
    ("unknown error kind", msgpack.packb({"v": CONTRACT_VERSION, "replies": [{"id": "x", "node": "w", "error": "boom", "message": ""}]})),  # noqa: E501
    ("outputs of the wrong size", msgpack.packb({"v": CONTRACT_VERSION, "replies": [{"id": "x", "node": "w", "batch_size": 1, "version": "1", "outputs": [["p", "FP32", [1, 10], b"\0"]]}]})),  # noqa: E501
    ("non-string map keys", msgpack.packb({1: 2})),
    ("huge garbage", b"\xc1" * HUGE),
]


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_hostile_messages_never_stop_a_worker_or_the_gateway(tmp_path: Path) -> None:
    assert len(WORKER_CORPUS) >= 20 and len(REPLY_CORPUS) >= 10
    with RingServe(tmp_path / "system", workers=2, settings={"GATEWAY_PROCESSES": "1"}) as system:
        processes = system.processes()
        stats = system.stats()
        reply_list = KEY_PREFIX + "reply:" + stats["gateway_id_this_process"]
        queues = Queues(system.redis_url)
        answers: list[tuple[int, str]] = []
        stop = threading.Event()

        def valid_load() -> None:
            i = 0
            while not stop.is_set() or i < 100:
                status, body = post(f"{system.url}/infer", {"key": f"user-{i}", "input": ROW})
                answers.append((status, body.get("node", body.get("error", ""))))
                i += 1

        load = threading.Thread(target=valid_load)
        load.start()
        try:
            for node in ("worker_1", "worker_2"):
                for _, _, push in WORKER_CORPUS:
                    push(queues, queue_name(node), reply_list)
            for _, blob in REPLY_CORPUS:
                queues.raw(reply_list, blob)
            expected_worker_drops = sum(drops for _, drops, _ in WORKER_CORPUS)

            def all_dropped() -> bool:
                dropped = system.stats()["dropped_messages"]
                return (
                    dropped.get("gateways", 0) >= len(REPLY_CORPUS)
                    and dropped.get("worker_1", 0) >= expected_worker_drops
                    and dropped.get("worker_2", 0) >= expected_worker_drops
                )

            wait_until(all_dropped, 30, "the workers and the gateway to count what they dropped")
        finally:
            stop.set()
            load.join()
            queues.close()
        after = system.stats()
        print(f"corpus: {len(WORKER_CORPUS)} worker kinds, {len(REPLY_CORPUS)} reply kinds; "
              f"dropped {after['dropped_messages']}; valid answers {len(answers)}")  # fmt: skip
        assert after["dropped_messages"] == {
            "gateways": len(REPLY_CORPUS),
            "worker_1": expected_worker_drops,
            "worker_2": expected_worker_drops,
        }
        assert [status for status, _ in answers] == [200] * len(answers), answers
        assert {node for _, node in answers} == {"worker_1", "worker_2"}
        assert system.processes() == processes  # the same pids, started at the same times: no restart
        assert all(after["threads_this_process"].values())
        with urllib.request.urlopen(f"{system.url}/v2/health/ready", timeout=10) as ready:
            assert ready.status == 200


def test_kombu_template_is_what_the_transport_stores(tmp_path: Path) -> None:
    """The corpus's kombu-level kinds mutate a real message: check it is one."""
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        queues = Queues(server.url())
        try:
            template = queues.template
            assert template["headers"]["task"] == TASK_NAME
            assert template["properties"]["body_encoding"] == "base64"
            assert base64.b64decode(template["body"])  # a msgpack body
        finally:
            queues.close()
    finally:
        server.stop()
