"""Wake waiting requests: one thread per gateway process pops this process's reply list.

Workers push one msgpack blob per batch onto ``ringserve:reply:<gateway id>``; one blocking
pop returns every blob waiting (``BLMPOP``, Redis 7; on 6.2 ``BLPOP`` then ``LPOP`` for the rest)
and every request in them is resolved. One list per process means one Redis connection and no
per-request subscription, however many requests are waiting.

Anybody who can write to Redis can push onto that list: a blob or a reply that does not
decode (:func:`tasks.contract.decode_replies`) is logged, counted and dropped, and the
thread goes on. The valid replies of a blob are resolved even when others in it are not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError, ResponseError

from tasks.contract import (
    STATS_DROPPED_KEY,
    ContractError,
    Drops,
    Reply,
    decode_replies,
    encode_replies,
    lacks_command,
)

log = logging.getLogger(__name__)

POP_TIMEOUT_S = 1  # how often the thread looks up from a quiet list to see if it must stop
BULK_BLOBS = 32  # blobs taken by one pop
RETRY_S = 0.2  # pause before trying again when Redis is unreachable


class ReplyListener:
    def __init__(self, redis: Redis, key: str, on_reply: Callable[[Reply], None]) -> None:
        self._redis = redis
        self._key = key
        self._on_reply = on_reply
        self.drops = Drops("gateway replies")
        self._stop = threading.Event()
        self._bulk_pop = True  # False once Redis said it has no BLMPOP
        self._thread = threading.Thread(target=self._run, name="ringserve-replies", daemon=True)

    @property
    def alive(self) -> bool:
        """The thread runs (an unexpected error would have ended it)."""
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:  # wake the blocking pop at once
            self._redis.rpush(self._key, encode_replies([]))
            self._redis.expire(self._key, 1)
        except RedisError:
            pass
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                blobs = self._pop()
            except RedisError as exc:
                log.warning("replies: cannot read Redis (%s); retrying", exc)
                self._stop.wait(RETRY_S)
                continue
            for blob in blobs:
                self._resolve(blob)

    def _pop(self) -> list[bytes]:
        """The blobs waiting, after waiting up to POP_TIMEOUT_S for the first. Raises RedisError."""
        if self._bulk_pop:
            try:
                taken: Any = self._redis.blmpop(POP_TIMEOUT_S, 1, self._key, direction="LEFT", count=BULK_BLOBS)
                return [] if taken is None else list(taken[1])  # [key, [blob, ...]]
            except ResponseError as exc:
                if not lacks_command(exc):
                    raise
                log.warning("replies: Redis has no BLMPOP (it came in 7.0): popping with BLPOP, then LPOP")
                self._bulk_pop = False
        first: Any = self._redis.blpop([self._key], timeout=POP_TIMEOUT_S)
        if first is None:
            return []
        try:  # what else waits, in one round trip; if Redis fails now, the next pop reports it
            more: list[bytes] = self._redis.lpop(self._key, BULK_BLOBS - 1) or []  # type: ignore[assignment]
        except RedisError:
            more = []
        return [first[1], *more]  # (key, blob)

    def _resolve(self, blob: bytes | str) -> None:
        try:
            replies, refused = decode_replies(blob)
        except ContractError as exc:
            replies, refused = [], [f"a blob: {exc}"]
        for reason in refused:
            self.drops.drop("replies that do not decode", reason)
        if refused:
            self._count_drops()
        for reply in replies:
            self._on_reply(reply)

    def _count_drops(self) -> None:
        try:
            self._redis.hincrby(STATS_DROPPED_KEY, "gateways", self.drops.take())
        except RedisError as exc:
            log.debug("replies: drop count not recorded: %s", exc)
