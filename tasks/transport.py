"""kombu's Redis transport, guarded and draining in bulk.

One blocking pop takes every message waiting (:class:`_BulkRead`), and the commands a channel
sends outside its event loop share one redis-py client (:class:`_OneClient`). A message that is
not even a kombu message is dropped:

kombu's Redis channel pops a message (``BRPOP``), parses it as JSON and builds a ``Message``
before Celery sees it. Garbage pushed onto a queue fails right there, inside the worker's
event loop, and Celery stops the worker ("Unrecoverable error") or takes it for a lost
connection. These classes wrap those two steps: what fails to become a message is logged,
counted and dropped. It is already off the list (and with ``ack_emulation`` off nothing keeps
a copy), so it never comes back. Connection errors of the pop itself pass through untouched:
kombu reconnects on those.

The channels also never put unacknowledged messages back on the queue when a connection
closes (kombu's ``do_restore``): the batch consumer answers what it holds before a reconnect,
and fail-over is the gateways' job, so a restored message would only be computed twice.

Celery picks this transport through ``broker_transport`` (see :mod:`tasks.celery_app`);
the URL keeps its ``redis://`` / ``rediss://`` or ``sentinel://`` scheme.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ResponseError

from tasks.contract import Drops, lacks_command

log = logging.getLogger(__name__)

DROPS = Drops("worker")
"""This process's count of dropped messages; the worker adds it to ``/stats`` every heartbeat."""
BULK_MESSAGES = 32  # most messages taken by one pop


class _OneClient:
    """Channel mixin: one redis-py client for the commands the channel sends outside its event loop.

    kombu's ``conn_or_acquire`` builds a new ``redis.Redis`` for each of them (the ``RPOP`` after
    every ``BRPOP``, every task event published), and building one copies redis-py's response
    callbacks into a new case-insensitive dict: 56 µs, more than the command's own round trip
    costs the worker. A client is a handle on the channel's connection pool, so one serves them
    all; it is made again only if the channel gets a new pool.
    """

    _sync_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool  # type: ignore[attr-defined]
        if self._sync_client is None or self._sync_client.connection_pool is not pool:
            self._sync_client = self._create_client()  # type: ignore[attr-defined]
        yield self._sync_client


class _BulkRead:
    """Channel mixin: one blocking pop takes every message waiting, up to :data:`BULK_MESSAGES`.

    kombu's Redis channel sends ``BRPOP`` for one message and registers a new one for the next: one
    event-loop turn and one round trip per message. With several workers on one host each message
    carries few requests, so that per-message cost is most of a worker's own CPU. This channel sends
    ``BLMPOP <timeout> <n> <queues> RIGHT COUNT <budget>`` instead (Redis 7.0), which answers with
    up to ``budget`` messages of the first non-empty queue, in the order ``BRPOP`` would have popped
    them. A server without ``BLMPOP`` answers "unknown command" once; from then on the channel pops as
    kombu does, then takes what else waits with one ``RPOP queue count`` (Redis 6.2).

    ``_brpop_start`` and ``_brpop_read`` are kombu 5.7's (``kombu.transport.redis.Channel``) with the
    command changed; kombu is pinned in requirements.txt because of them.
    """

    _bulk_pop = True  # False once the server said it has no BLMPOP

    def _budget(self) -> int:
        """How many messages the prefetch limit lets us take now."""
        estimate = self.qos.can_consume_max_estimate()  # type: ignore[attr-defined]  # None: no prefetch limit
        return BULK_MESSAGES if estimate is None else min(BULK_MESSAGES, estimate)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._bulk_pop or self.global_keyprefix:  # type: ignore[attr-defined]  # kombu prefixes BRPOP only
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        queues = self._queue_cycle.consume(len(self.active_queues))  # type: ignore[attr-defined]
        if not queues:
            return
        keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]  # type: ignore[attr-defined]
        connection = self.client.connection  # type: ignore[attr-defined]
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        wait = self.brpop_timeout if timeout is None else timeout  # type: ignore[attr-defined]
        count = max(1, self._budget())  # kombu starts a pop only when the limit lets one more in
        connection.send_command("BLMPOP", wait or 0, len(keys), *keys, "RIGHT", "COUNT", count)

    def _brpop_read(self, **options: Any) -> bool:
        if not self._bulk_pop or self.global_keyprefix:  # type: ignore[attr-defined]
            delivered: bool = super()._brpop_read(**options)  # type: ignore[misc]
            if delivered:
                self._pop_waiting()
            return delivered
        client = self.client  # type: ignore[attr-defined]
        try:
            try:
                popped = client.parse_response(client.connection, "BLMPOP", **options)
            except self.connection_errors:  # type: ignore[attr-defined]
                client.connection.disconnect()  # the next turn reconnects
                raise
            except ResponseError as exc:
                if not lacks_command(exc):
                    raise
                log.warning("Redis has no BLMPOP (it came in 7.0): popping with BRPOP, then RPOP for the rest")
                self._bulk_pop = False
                raise Empty() from None
            if not popped:
                raise Empty()
            dest = bytes_to_str(popped[0]).rsplit(self.sep, 1)[0]  # type: ignore[attr-defined]
            self._queue_cycle.rotate(dest)  # type: ignore[attr-defined]
            for item in popped[1]:
                _deliver_raw(self, item, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # type: ignore[attr-defined]

    def _pop_waiting(self) -> None:
        """After a ``BRPOP`` (no ``BLMPOP`` on the server): what else waits, in one round trip."""
        budget = self._budget()
        for queue in self._active_queues:  # type: ignore[attr-defined]
            if budget <= 0:
                return
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                items = client.rpop(queue, budget) or []
            budget -= len(items)
            for item in items:
                _deliver_raw(self, item, queue)


def _deliver_raw(channel: Any, item: bytes, queue: str) -> None:
    """One popped item to kombu; one that is not JSON is dropped (as in :class:`_GuardedRead`)."""
    try:
        message = loads(bytes_to_str(item))
    except ValueError as exc:  # JSON or UTF-8
        DROPS.drop("messages that are not JSON", f"{type(exc).__name__}: {exc}")
        return
    channel.connection._deliver(message, queue)  # guarded by _GuardedDelivery


class _GuardedRead:
    """Channel mixin: a popped item that is not JSON is dropped (kombu would raise out of the loop)."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc, no-any-return]
        except ValueError as exc:  # JSON or UTF-8; a connection error is never a ValueError
            DROPS.drop("messages that are not JSON", f"{type(exc).__name__}: {exc}")
            return True


class _GuardedDelivery:
    """Transport mixin: JSON that does not make a kombu message (or a delivery that fails on it) is dropped.

    Guarded here rather than in the channel because kombu counts ``KeyError`` — what building a
    message from JSON of the wrong shape raises — among its Redis *connection* errors, so
    Celery would take garbage for a lost connection and reconnect.
    """

    def _deliver(self, message: Any, queue: str) -> None:
        try:
            super()._deliver(message, queue)  # type: ignore[misc]
        except Exception as exc:
            DROPS.drop("messages that are not kombu messages", f"{type(exc).__name__}: {exc}")


class Channel(_GuardedRead, _BulkRead, _OneClient, redis.Channel):  # type: ignore[misc]
    do_restore = False  # see below


class Transport(_GuardedDelivery, redis.Transport):  # type: ignore[misc]
    Channel = Channel


class SentinelChannel(_GuardedRead, _BulkRead, _OneClient, redis.SentinelChannel):  # type: ignore[misc]
    do_restore = False


class SentinelTransport(_GuardedDelivery, redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel


def transport_for(url: str) -> str:
    """The ``broker_transport`` setting for a broker URL."""
    return f"{__name__}:{'SentinelTransport' if url.startswith('sentinel') else 'Transport'}"
