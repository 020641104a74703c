"""kombu's Redis transport, guarded and draining in bulk.

After each ``BRPOP`` the channel pops what else waits in one round trip (:class:`_BulkRead`),
through one redis-py client per channel (:class:`_OneClient`). A message that is not even a
kombu message is dropped:

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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tasks.contract import Drops

DROPS = Drops("worker")
"""This process's count of dropped messages; the worker adds it to ``/stats`` every heartbeat."""
BULK_MESSAGES = 32  # most messages popped in one round trip after a BRPOP


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
    """Channel mixin: after each ``BRPOP`` delivers one message, pop what else waits in the
    channel's queues in one round trip (``RPOP queue count``, within the prefetch budget).

    kombu's Redis channel pops one message per ``BRPOP`` and registers a new ``BRPOP`` for the
    next, one event-loop turn and one round trip per message: with several workers on one host
    each message carries few requests, so that per-message cost is most of a worker's own CPU.
    """

    def _brpop_read(self, **options: Any) -> bool:
        delivered: bool = super()._brpop_read(**options)  # type: ignore[misc]
        if delivered:
            self._pop_waiting()
        return delivered

    def _pop_waiting(self) -> None:
        estimate = self.qos.can_consume_max_estimate()  # type: ignore[attr-defined]  # None: no prefetch limit
        budget = BULK_MESSAGES if estimate is None else min(BULK_MESSAGES, estimate)
        for queue in self._active_queues:  # type: ignore[attr-defined]
            if budget <= 0:
                return
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                items = client.rpop(queue, budget) or []
            budget -= len(items)
            for item in items:
                try:
                    message = loads(bytes_to_str(item))
                except ValueError as exc:  # JSON or UTF-8, as in _GuardedRead
                    DROPS.drop("messages that are not JSON", f"{type(exc).__name__}: {exc}")
                    continue
                self.connection._deliver(message, queue)  # type: ignore[attr-defined]  # guarded


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
