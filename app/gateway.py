"""The gateway's moving parts in one process: ring membership, the sender, the reply listener, the cache.

Threads cannot survive a fork, and WSGI servers fork their workers after loading the app,
so :meth:`Gateway.ensure_started` starts them in the process that serves, on its first
request (and again in a child forked later).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis

from app.breaker import Breaker
from app.cache import LEASE_MS, LOOKUP_TIMEOUT_S, Cache, computed
from app.errors import DeadlineExceeded, TooManyRequests, Unavailable, error_for_status
from app.metrics import count_cache_lookup
from app.replies import ReplyListener
from app.routing import EmptyRingError, Router, WorkerFull
from app.schemas import Tensor
from app.shards import gather, split
from app.submit import Call, Dispatcher, Lookup
from hashing.membership import Follower, Membership
from hashing.shards import ring_digest
from tasks.contract import (
    ANNOUNCEMENTS,
    WHOLE_TABLE,
    ContractError,
    Failure,
    Result,
    ShardStatus,
    decode_served_versions,
    decode_shard_statuses,
    shard_status_key,
    shard_table_name,
    versions_key,
)
from tasks.metadata import Catalog, ModelMetadata
from tasks.settings import Settings


@dataclass(frozen=True)
class Answer:
    """What :meth:`Gateway.infer` gives a route: the result, and whether it came from the response cache."""

    result: Result
    cached: bool = False


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog = Catalog(settings.model_repository, settings.repository_poll_ms)
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
            router = Router(s.vnodes, s.load_factor, s.max_in_flight_per_worker, breaker, processes=s.gateway_processes)
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
            self.cache: Cache | None = None
            if s.cache:
                # its own clients (it may be another Redis): a follower blocks on one for up to a lease;
                # the sender makes its lookups on the other, which must not hold up every request for long
                url = s.cache_redis_url or s.redis_url
                cache_redis = Redis.from_url(url, socket_timeout=2 * LEASE_MS / 1000, socket_connect_timeout=0.5)
                lookups = Redis.from_url(url, socket_timeout=LOOKUP_TIMEOUT_S, socket_connect_timeout=LOOKUP_TIMEOUT_S)
                self.cache = Cache(cache_redis, s.cache_ttl_s, s.cache_max_bytes, self.dispatcher.gateway_id, lookups)
                self.dispatcher.look = self.cache.look
                self.cache.start()
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
            if self.cache is not None:
                self.cache.stop()
            self.redis.close()
            self._pid = None

    @property
    def models(self) -> dict[str, ModelMetadata]:
        """The models served, as the repository held them at most ``repository_poll_ms`` ago."""
        return self.catalog.models

    def threads(self) -> dict[str, bool]:
        """Whether each of this process's threads runs; one that died makes it unready."""
        return {
            "membership": self.follower.alive,
            "replies": self.listener.alive,
            "sender": self.dispatcher.alive,
        } | ({} if self.cache is None else {"cache": self.cache.alive})

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

        def compute(lookup: Lookup | None) -> Result | None:
            return self._compute(key, meta, version, tensors, deadline, limit_ms, lookup)

        if self.cache is None or not meta.response_cache:
            return Answer(computed(compute(None)))  # no lookup: a worker's answer
        result, cached = self.cache.through(meta.name, version, tensors, deadline, compute)
        count_cache_lookup(meta.name, version, cached)
        return Answer(result, cached)

    def _compute(
        self,
        key: str,
        meta: ModelMetadata,
        version: str,
        tensors: list[Tensor],
        deadline: float,
        limit_ms: float,
        lookup: Lookup | None = None,
    ) -> Result | None:
        """The worker's result (a sharded model's: gathered from the workers that hold its rows), or None
        when the cache ``lookup``, made by the sender first, found an entry (then nothing was sent)."""

        def submit(part: list[Tensor], position: int | None) -> Call:
            try:
                rows = self.max_rows(meta)
                return self.dispatcher.submit(key, meta.name, version, part, deadline, rows, position, lookup)
            except EmptyRingError:
                raise Unavailable("no worker is alive") from None
            except WorkerFull as exc:
                raise TooManyRequests(f"worker {exc.node} has too many requests in flight; retry shortly") from None

        if meta.sharding is None:
            return self._result(submit(tensors, None), deadline, limit_ms)
        parts = split(tensors, meta.sharding, self.dispatcher.router.placements)
        calls: list[Call] = []
        try:
            for part in parts:  # one lookup for them all: made before any of them is sent
                calls.append(submit(part.tensors, part.position))
            results = [self._result(call, deadline, limit_ms) for call in calls]
        except Exception:
            for call in calls:  # the answer is lost anyway: stop waiting for the other parts
                self.dispatcher.forget(call, worker_fault=False)
            raise
        answered = [result for result in results if result is not None]
        if len(answered) < len(results):  # the lookup found an entry: no part was sent
            return None
        return gather(parts, answered, tensors[0].shape[0])

    def _result(self, call: Call, deadline: float, limit_ms: float) -> Result | None:
        """Wait for ``call`` until ``deadline`` (``limit_ms`` after the request came); its result, or its
        error; None if its cache lookup found an entry, so that it was not sent."""
        if not call.wait(max(0.0, deadline - time.monotonic())):
            # Only the server's own timeout blames the worker; a client's shorter one does not.
            self.dispatcher.forget(call, worker_fault=limit_ms >= self.settings.request_timeout_ms)
            raise DeadlineExceeded(f"no result within {limit_ms:g} ms")
        if call.found_in_cache:
            return None
        if call.error is not None:
            raise call.error
        if isinstance(call.reply, Failure):
            raise error_for_status(call.reply.kind.status, call.reply.message)
        assert isinstance(call.reply, Result)  # a call is finished only with a reply or an error
        return call.reply

    def cache_stats(self) -> dict[str, Any]:
        """The response cache's figures for /stats (``{"enabled": false}`` when it is off)."""
        return {"enabled": False} if self.cache is None else {"enabled": True, **self.cache.stats()}

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

    def unserved_versions(self, meta: ModelMetadata, versions: tuple[str, ...]) -> list[str]:
        """Those of ``versions`` of ``meta`` that no live worker reports it has loaded."""
        live = sorted(n for n in self.follower.members if n not in self.follower.silent)
        served: set[str] = set()
        for value in self.redis.mget([versions_key(n) for n in live]) if live else []:
            try:
                served |= decode_served_versions(value).get(meta.name, set()) if value is not None else set()
            except ContractError:
                continue
        return [v for v in versions if v not in served]

    def unready_shards(self, meta: ModelMetadata, version: str) -> str | None:
        """Why some row of ``meta``'s sharded table has no live holder that loaded it; None when all have.

        Workers hold the rows of the ring of announced members (:mod:`tasks.shards`): each live one
        must report that ring loaded, and fewer members may be silent than each row has holders.
        """
        assert meta.sharding is not None
        members, silent = self.follower.members, self.follower.silent & set(self.follower.members)
        if not members:
            return "no worker is alive"
        if len(silent) >= min(meta.sharding.replicas, len(members)):
            return f"the rows of {', '.join(sorted(silent))} have no live holder"
        name = shard_table_name(meta.name, version)
        wanted = (ring_digest({n: m.weight for n, m in members.items()}), WHOLE_TABLE)
        reports = self.shard_reports()

        def loaded(node: str) -> bool:
            return name in reports.get(node, {}) and reports[node][name].ring in wanted

        loading = sorted(n for n in members if n not in silent and not loaded(n))
        return f"workers {', '.join(loading)} have not loaded their rows of {name}" if loading else None
