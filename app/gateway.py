"""The gateway's moving parts in one process: ring membership, the sender, the reply listener.

Threads cannot survive a fork, and WSGI servers fork their workers after loading the app,
so :meth:`Gateway.ensure_started` starts them in the process that serves, on its first
request (and again in a child forked later).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from redis import Redis

from app.breaker import Breaker
from app.errors import DeadlineExceeded, TooManyRequests, Unavailable, error_for_status
from app.replies import ReplyListener
from app.routing import EmptyRingError, Router, WorkerFull
from app.schemas import Tensor
from app.submit import Call, Dispatcher
from hashing.membership import Follower, Membership
from tasks.celery_app import make_celery
from tasks.metadata import ModelMetadata, load_repository
from tasks.settings import Settings


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ModelMetadata] = load_repository(settings.model_repository)
        self._pid: int | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            s = self.settings
            self.redis = Redis.from_url(
                s.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
            )
            breaker = Breaker(s.breaker_failures, s.breaker_cooldown_ms / 1000)
            router = Router(s.vnodes, s.load_factor, s.max_in_flight_per_worker, breaker)
            self.dispatcher = Dispatcher(make_celery(s), self.redis, router)
            self.follower = Follower(
                Membership(self.redis, s.member_ttl_ms),
                s.ring_refresh_ms,
                self.dispatcher.set_members,
                self.dispatcher.redis_lost,
            )
            self.listener = ReplyListener(self.redis, self.dispatcher.reply_key, self.dispatcher.resolve)
            self.follower.start()
            self.listener.start()
            self.dispatcher.start()
            self._pid = os.getpid()

    def stop(self) -> None:
        """Stop this process's threads (tests; a served process simply exits)."""
        if self._pid == os.getpid():
            self.follower.stop()
            self.listener.stop()
            self.dispatcher.stop()
            self.redis.close()
            self._pid = None

    @property
    def ready(self) -> bool:
        return self.follower.healthy and len(self.dispatcher.router) > 0

    def max_rows(self, meta: ModelMetadata) -> int:
        return meta.max_batch_size or self.settings.max_batch_size

    def infer(
        self, key: str, meta: ModelMetadata, version: str, tensors: list[Tensor], timeout_ms: float | None = None
    ) -> dict[str, Any]:
        """Send one request to its worker and wait for its reply (or raise the error it got).

        ``timeout_ms`` (the client's) may only shorten the server's request timeout.
        """
        if not self.follower.healthy:
            raise Unavailable("the queue (Redis) is unreachable")
        limit_ms = (
            self.settings.request_timeout_ms
            if timeout_ms is None
            else min(timeout_ms, self.settings.request_timeout_ms)
        )
        try:
            call: Call = self.dispatcher.submit(key, meta.name, version, tensors, time.time() + limit_ms / 1000)
        except EmptyRingError:
            raise Unavailable("no worker is alive") from None
        except WorkerFull as exc:
            raise TooManyRequests(f"worker {exc.node} has too many requests in flight; retry shortly") from None
        if not call.done.wait(limit_ms / 1000):
            self.dispatcher.forget(call)
            raise DeadlineExceeded(f"no result within {limit_ms:g} ms")
        reply = call.reply or {}
        if "error" in reply:
            raise error_for_status(int(reply.get("status", 500)), str(reply["error"]))
        return reply
