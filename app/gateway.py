"""The gateway's moving parts in one process: ring membership, the sender, the reply listener.

Threads cannot survive a fork, and WSGI servers fork their workers after loading the app,
so :meth:`Gateway.ensure_started` starts them in the process that serves, on its first
request (and again in a child forked later).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from redis import Redis

from app.breaker import Breaker
from app.errors import DeadlineExceeded, TooManyRequests, Unavailable, error_for_status
from app.replies import ReplyListener
from app.routing import EmptyRingError, Router, WorkerFull
from app.schemas import Tensor
from app.shards import gather, split
from app.submit import Call, Dispatcher
from hashing.membership import Follower, Membership
from hashing.shards import ring_digest
from tasks.contract import (
    ANNOUNCEMENTS,
    WHOLE_TABLE,
    ContractError,
    Failure,
    Result,
    ShardStatus,
    decode_shard_statuses,
    shard_status_key,
    shard_table_name,
)
from tasks.metadata import ModelMetadata, load_repository
from tasks.settings import Settings


@dataclass(frozen=True)
class Answer:
    """What :meth:`Gateway.infer` gives a route: the result, and whether it came from the response cache."""

    result: Result
    cached: bool = False


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
            self.dispatcher = Dispatcher(self.redis, router, s.queue_grace_s)
            self.follower = Follower(
                Membership(self.redis, s.member_ttl_ms, ANNOUNCEMENTS),
                s.ring_refresh_ms,
                self.dispatcher.set_members,
                self.dispatcher.redis_lost,
                self.dispatcher.redis_back,
                self.dispatcher.set_silent,
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

    def threads(self) -> dict[str, bool]:
        """Whether each of this process's threads runs; one that died makes it unready."""
        return {
            "membership": self.follower.alive,
            "replies": self.listener.alive,
            "sender": self.dispatcher.alive,
        }

    @property
    def ready(self) -> bool:
        return self.follower.healthy and len(self.dispatcher.router) > 0 and all(self.threads().values())

    def max_rows(self, meta: ModelMetadata) -> int:
        return meta.max_batch_size or self.settings.max_batch_size

    def infer(
        self, key: str, meta: ModelMetadata, version: str, tensors: list[Tensor], timeout_ms: float | None = None
    ) -> Answer:
        """Send one request to its worker and wait for its result (or raise the error it got).

        A sharded model's request goes to the workers that hold its rows, split if they are
        several (:mod:`app.shards`); ``key`` does not route it. ``timeout_ms`` (the client's)
        may only shorten the server's request timeout.
        """
        if not self.follower.healthy:
            raise Unavailable("the queue (Redis) is unreachable")
        limit_ms = (
            self.settings.request_timeout_ms
            if timeout_ms is None
            else min(timeout_ms, self.settings.request_timeout_ms)
        )
        deadline = time.monotonic() + limit_ms / 1000
        if meta.sharding is None:
            call = self._submit(key, meta, version, tensors, deadline, None)
            return Answer(self._result(call, deadline, limit_ms))
        parts = split(tensors, meta.sharding, self.dispatcher.router.placements)
        calls: list[Call] = []
        try:
            for part in parts:
                calls.append(self._submit(key, meta, version, part.tensors, deadline, part.position))
            results = [self._result(call, deadline, limit_ms) for call in calls]
        except Exception:
            for call in calls:  # the answer is lost anyway: stop waiting for the other parts
                self.dispatcher.forget(call, worker_fault=False)
            raise
        return Answer(gather(parts, results, tensors[0].shape[0]))

    def _submit(
        self, key: str, meta: ModelMetadata, version: str, tensors: list[Tensor], deadline: float, position: int | None
    ) -> Call:
        try:
            return self.dispatcher.submit(key, meta.name, version, tensors, deadline, self.max_rows(meta), position)
        except EmptyRingError:
            raise Unavailable("no worker is alive") from None
        except WorkerFull as exc:
            raise TooManyRequests(f"worker {exc.node} has too many requests in flight; retry shortly") from None

    def _result(self, call: Call, deadline: float, limit_ms: float) -> Result:
        """Wait for ``call`` until ``deadline`` (``limit_ms`` after the request came); its result, or its error."""
        if not call.wait(max(0.0, deadline - time.monotonic())):
            # Only the server's own timeout blames the worker; a client's shorter one does not.
            self.dispatcher.forget(call, worker_fault=limit_ms >= self.settings.request_timeout_ms)
            raise DeadlineExceeded(f"no result within {limit_ms:g} ms")
        if call.error is not None:
            raise call.error
        if isinstance(call.reply, Failure):
            raise error_for_status(call.reply.kind.status, call.reply.message)
        assert isinstance(call.reply, Result)  # a call is finished only with a reply or an error
        return call.reply

    def shard_reports(self) -> dict[str, dict[str, ShardStatus]]:
        """What each live worker reports it holds of the sharded tables; unreadable reports are left out."""
        nodes = sorted(self.follower.members)
        raw = self.redis.mget([shard_status_key(n) for n in nodes]) if nodes else []
        reports = {}
        for node, value in zip(nodes, raw, strict=True):
            if value is not None:
                try:
                    reports[node] = decode_shard_statuses(value)
                except ContractError:
                    continue
        return reports

    def unready_shards(self, meta: ModelMetadata, version: str) -> str | None:
        """Why some row of ``meta``'s sharded table has no live holder that loaded it; None when all have."""
        live = {n: m.weight for n, m in self.follower.members.items() if n not in self.follower.silent}
        if not live:
            return "no worker is alive"
        name = shard_table_name(meta.name, version)
        wanted = (ring_digest(live), WHOLE_TABLE)
        reports = self.shard_reports()
        loading = sorted(n for n in live if name not in reports.get(n, {}) or reports[n][name].ring not in wanted)
        return f"workers {', '.join(loading)} have not loaded their rows of {name}" if loading else None
