"""Wake waiting requests: one thread per gateway process pops this process's reply list.

Workers push one msgpack blob per batch onto ``ringserve:reply:<gateway id>``; a blocking
pop returns it and every request in it is resolved. One list per process means one Redis
connection and no per-request subscription, however many requests are waiting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import msgpack
from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

POP_TIMEOUT_S = 1  # how often the thread looks up from a quiet list to see if it must stop
RETRY_S = 0.2  # pause before trying again when Redis is unreachable


class ReplyListener:
    def __init__(self, redis: Redis, key: str, on_reply: Callable[[dict[str, Any]], None]) -> None:
        self._redis = redis
        self._key = key
        self._on_reply = on_reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ringserve-replies", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:  # wake the blocking pop at once
            self._redis.rpush(self._key, msgpack.packb([]))
            self._redis.expire(self._key, 1)
        except RedisError:
            pass
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                popped = self._redis.blpop([self._key], timeout=POP_TIMEOUT_S)
            except RedisError as exc:
                log.warning("replies: cannot read Redis (%s); retrying", exc)
                self._stop.wait(RETRY_S)
                continue
            if popped is None:
                continue
            try:
                replies = msgpack.unpackb(popped[1])
            except (ValueError, msgpack.UnpackException) as exc:
                log.error("replies: unreadable blob dropped: %s", exc)
                continue
            for reply in replies:
                self._on_reply(reply)
