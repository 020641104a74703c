"""The batch consumer: the Celery glue around :mod:`tasks.batching` and :mod:`tasks.engine`.

Celery lets a task bring its own *strategy*: the function the worker calls for each message
of that task. Ours does not run the task per message; it adds the message's requests to the
collector and, when a batch is due, runs one numpy forward for the whole batch and pushes
every request's result (or its own error) to the gateway's reply list in one pipeline.
Messages are acknowledged only after all their requests were answered.

We wrote this instead of using celery-batches because that package (0.11) pins
``celery<5.7``, counts messages rather than rows, flushes on a fixed repeating timer rather
than the oldest request's age, builds a full Celery ``Request`` per message, and leaves
per-request results to the user. This module is that package's idea (a Strategy that
buffers) with our policy.

Everything here runs on the worker's event-loop thread (solo pool): the strategy, the
timers and the forward pass, so no locks are needed.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

import celery.worker.consumer
import numpy as np
from celery import Celery, Task, bootsteps, signals
from celery.worker.state import maybe_shutdown
from redis import Redis
from redis.exceptions import RedisError

from hashing.membership import Follower, Member, Membership
from tasks.batching import Batch, BatchPolicy, Collector
from tasks.contract import (
    ANNOUNCEMENTS,
    DATATYPES,
    METRICS_KEY,
    STATS_BATCHES_KEY,
    STATS_DROPPED_KEY,
    STATS_EXPIRED_KEY,
    TASK_NAME,
    BadItem,
    ContractError,
    Envelope,
    ErrorKind,
    Failure,
    Item,
    Reply,
    Result,
    Tensor,
    decode_envelope,
    encode_replies,
    encode_served_versions,
    encode_shard_statuses,
    node_id_from_hostname,
    queue_name,
    shard_status_key,
    versions_key,
)
from tasks.engine import InputError, Model
from tasks.events import HOLD_S, TaskEvents
from tasks.metrics import Forward, batch_counts
from tasks.repository import Repository, UnknownModelError
from tasks.settings import Settings
from tasks.shards import ShardKeeper
from tasks.transport import DROPS

log = logging.getLogger(__name__)

RECONNECT_S = 0.25  # between attempts to reach the broker while it is down


@dataclass
class Delivery:
    """One Celery message: acknowledged once each of its requests has been answered."""

    reply_to: str
    unanswered: int
    ack: Callable[[], None]
    received: float  # time.monotonic() when it arrived

    def answered(self) -> None:
        self.unanswered -= 1
        if self.unanswered == 0:
            self.ack()


@dataclass
class Pending:
    item: Item
    deadline: float  # time.monotonic() of this host: receipt + the item's budget
    delivery: Delivery


def check_inputs(model: Model, item: Item) -> None:
    """The item's tensors are the model's inputs, so it cannot fail a batch it joins."""
    specs = {s.name: s for s in model.metadata.inputs}
    if sorted(t.name for t in item.inputs) != sorted(specs):
        raise InputError(f"model {model.metadata.name} takes inputs {sorted(specs)}")
    for t in item.inputs:
        spec = specs[t.name]
        if t.datatype != spec.datatype or t.shape[1:] != spec.row_shape:
            raise InputError(f"input {t.name!r} must be {spec.datatype} of shape {list(spec.shape)}")


def decode_inputs(item: Item) -> dict[str, np.ndarray]:
    """The item's tensors as arrays (their sizes were checked by the contract)."""
    return {t.name: np.frombuffer(t.data, dtype=DATATYPES[t.datatype].numpy).reshape(t.shape) for t in item.inputs}


def envelope_of(decoded: Any) -> Envelope:
    """The envelope of a decoded task message body ``(args, kwargs, embed)``."""
    if type(decoded) not in (list, tuple) or len(decoded) != 3:
        raise ContractError("the task body is not (args, kwargs, embed)")
    args = decoded[0]
    if type(args) not in (list, tuple) or len(args) != 1:
        raise ContractError("the task takes exactly one argument, the envelope")
    return decode_envelope(args[0])


def encode_outputs(model: Model, outputs: dict[str, np.ndarray], start: int, stop: int) -> tuple[Tensor, ...]:
    tensors = []
    for spec in model.metadata.outputs:
        part = np.ascontiguousarray(outputs[spec.name][start:stop])
        tensors.append(Tensor(spec.name, spec.datatype, part.shape, part.tobytes()))
    return tuple(tensors)


class Server:
    """One worker's serving state: its models, its collector, its place in the ring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.repository = Repository(settings.model_repository, grace_s=settings.version_grace_ms / 1000)
        self.redis = Redis.from_url(settings.redis_url)
        self.membership = Membership(self.redis, settings.member_ttl_ms, ANNOUNCEMENTS)
        self.member = Member(settings.node_weight, uuid.uuid4().hex, settings.heartbeat_ms, settings.member_ttl_ms)
        self.collector: Collector[Pending] = Collector(self._policy)
        self._timer: Any = None
        self._wakeup: Any = None
        self._wakeup_at: float | None = None
        self._heartbeat: Any = None
        self._events_timer: Any = None
        self._rescan: Any = None
        self._connection_errors: tuple[type[BaseException], ...] = ()
        self._events: TaskEvents | None = None  # through the worker's event dispatcher, while task events are on
        self._loaded = False
        self._server_id: str | None = None
        self.keeper: ShardKeeper | None = None  # while some model has a sharded table
        self._follower: Follower | None = None  # membership, for the keeper

    # -- life cycle ----------------------------------------------------------------------

    def start(self, consumer: Any) -> Callable[..., None]:
        """Called by Celery when the worker (re)connects; returns the message handler."""
        self.node_id = self.settings.node_id or node_id_from_hostname(consumer.hostname)
        if not ANNOUNCEMENTS.valid_node_id(self.node_id):
            raise ValueError(f"node id {self.node_id!r}: use 1-64 letters, digits, '_', '.' or '-'")
        own_queue = queue_name(self.node_id)
        if own_queue not in consumer.app.amqp.queues:
            log.warning("node %s does not consume %s: start it with -Q %s", self.node_id, own_queue, own_queue)
        if not self._loaded:
            started = time.perf_counter()
            self.repository.load_all()
            self._keep_shards()
            self._loaded = True
            log.info(
                "node %s: loaded %s in %.2f s",
                self.node_id,
                ", ".join(self.repository.names()),
                time.perf_counter() - started,
            )
            # Whatever waits in our queue was sent to an earlier run of this node; the gateways
            # re-send it when they see that run leave or restart, so executing it now would only
            # compute stale work. (On a mere reconnect the queue is kept: it is ours.)
            stale = consumer.connection.default_channel.queue_purge(own_queue)
            if stale:
                log.warning("node %s: discarded %d messages left from an earlier run", self.node_id, stale)
        self._cancel_wakeup()  # a reconnect brings a new timer: nothing scheduled on the old one
        self._timer = consumer.timer
        self._connection_errors = consumer.connection_errors
        dispatcher = consumer.event_dispatcher  # a new one after each reconnect
        self._events = TaskEvents(dispatcher.send) if self.settings.task_events and dispatcher is not None else None
        if self._events is not None:
            self._events_timer = self._timer.call_repeatedly(HOLD_S, self._events.flush)
        self._announce()
        self._heartbeat = self._timer.call_repeatedly(self.settings.heartbeat_ms / 1000, self._announce)
        if self.settings.repository_poll_ms > 0:
            self._rescan = self._timer.call_repeatedly(self.settings.repository_poll_ms / 1000, self._reload)
        self._schedule()
        log.info("node %s: serving %s", self.node_id, own_queue)
        return self.on_message

    def _keep_shards(self) -> None:
        """Follow membership so that every sharded table holds our rows of the ring (:mod:`tasks.shards`).

        The rows load on the keeper's thread after we announce ourselves: until they are in,
        the rows asked of us are read from the table file, and readiness says they are loading.
        """
        shards = self.repository.shards()
        if not shards:
            return
        s = self.settings
        self.keeper = ShardKeeper(
            self.node_id,
            s.node_weight,
            s.vnodes,
            shards,
            not s.sharding,
            s.shard_settle_ms / 1000,
            s.shard_grace_ms / 1000,
            self._report_shards,
        )
        follower = Follower(
            self.membership, s.ring_refresh_ms, self._follow, lambda: None, lambda lost: None, lambda silent: None
        )
        follower.poll()
        self._follower = follower
        self.keeper.start(self._ring(follower))
        follower.start()

    @staticmethod
    def _ring(follower: Follower) -> dict[str, float]:
        """The announced members by weight: the ring whose rows we hold.

        A member that missed its heartbeats keeps its rows here until its announcement expires:
        a crashed worker that supervision restarts within the ttl comes back to find the ring as
        it left it, rather than every other worker loading its part and dropping it again.
        Meanwhile gateways route around it, to its replicas (which hold its rows) or, with one
        replica, to workers that read its rows from the table file.
        """
        return {n: m.weight for n, m in follower.members.items()}

    def _follow(self, _: object) -> None:
        if self.keeper is not None and self._follower is not None:
            self.keeper.follow(self._ring(self._follower))

    def _report_shards(self) -> None:
        """Say which rows we hold, for as long as our announcement lives; a dead keeper says nothing
        (so gateways see the model unready)."""
        if self.keeper is None:
            return
        key = shard_status_key(self.node_id)
        try:
            if self.keeper.alive or not self._loaded:
                self.redis.set(key, encode_shard_statuses(self.keeper.statuses()), px=self.settings.member_ttl_ms)
            else:
                self.redis.delete(key)
        except RedisError as exc:
            log.warning("node %s: shard report failed: %s", self.node_id, exc)

    def stop(self) -> None:
        """Leave the ring first, then answer everything still held.

        Celery also stops (and restarts) this step when the broker connection drops, so the
        tables and their keeper stay: they are the process's, not the connection's.
        """
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._rescan is not None:
            self._rescan.cancel()
            self._rescan = None
        try:
            self.membership.leave(self.node_id)
            self.redis.delete(versions_key(self.node_id))
            if self.keeper is not None:
                self.redis.delete(shard_status_key(self.node_id))
            log.info("node %s: left the ring", self.node_id)
        except RedisError as exc:
            log.warning("node %s: could not leave the ring (%s); it will expire", self.node_id, exc)
        self._cancel_wakeup()
        for batch in self.collector.drain():
            self._run(batch)
        if self._events_timer is not None:
            self._events_timer.cancel()
            self._events_timer = None
        if self._events is not None:
            self._events.flush()

    def _announce(self) -> None:
        """Heartbeat (and every reconnect): refresh the announcement, publish the drop count.

        A new Redis ``run_id`` means the server lost its data, our announcement included: say
        so; the announcement below puts us back in every ring at once.
        """
        dropped = DROPS.take()
        try:
            server_id = self.membership.server_id()
            if self._server_id not in (None, server_id):
                log.warning("node %s: Redis is a new server (its data is gone); announcing again", self.node_id)
            self._server_id = server_id
            self._report_versions()  # before the announcement: a member that is seen has said what it serves
            self.membership.announce(self.node_id, self.member)
            self._report_shards()
            self.redis.persist(queue_name(self.node_id))  # ours again: gateways let departed queues expire
            if dropped:
                self.redis.hincrby(STATS_DROPPED_KEY, self.node_id, dropped)
        except RedisError as exc:
            log.warning("node %s: heartbeat failed: %s", self.node_id, exc)

    def _reload(self) -> None:
        """Timer: take in changes of the model repository; new versions are loaded before they are reported."""
        if self.repository.refresh():
            self._report_versions()

    def _report_versions(self) -> None:
        """Say which model versions we serve, for as long as our announcement lives (per-version readiness)."""
        served = encode_served_versions(self.repository.served())
        try:
            self.redis.set(versions_key(self.node_id), served, px=self.settings.member_ttl_ms)
        except RedisError as exc:
            log.warning("node %s: versions report failed: %s", self.node_id, exc)

    # -- messages ------------------------------------------------------------------------

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        """Celery's strategy signature; ``ack`` is the worker's acknowledge promise.

        A message that is a valid Celery message but not a valid envelope is acknowledged,
        counted and dropped; an item that does not decode is answered 400 on its own.
        """
        acknowledge = functools.partial(ack, log, self._connection_errors)
        try:
            envelope = envelope_of(message.decode())
        except ContractError as exc:
            DROPS.drop("task messages that are not envelopes", str(exc))
            acknowledge()
            return
        if not envelope.items:
            acknowledge()
            return
        now = time.monotonic()
        delivery = Delivery(envelope.reply_to, len(envelope.items), acknowledge, now)
        refused: list[tuple[Delivery, Reply]] = []
        for entry in envelope.items:
            if isinstance(entry, BadItem):
                if entry.id is None:
                    DROPS.drop("requests without an id", entry.reason)
                    delivery.answered()
                else:
                    refused.append((delivery, self._failure(entry.id, ErrorKind.BAD_INPUT, entry.reason)))
                continue
            try:
                check_inputs(self.repository.get(entry.model, entry.version), entry)
                pending = Pending(entry, now + entry.budget_ms / 1000, delivery)
                for batch in self.collector.add((entry.model, entry.version), pending, entry.rows, now):
                    self._run(batch)
            except UnknownModelError as exc:
                refused.append((delivery, self._failure(entry.id, ErrorKind.UNKNOWN_MODEL, str(exc))))
            except ValueError as exc:  # InputError, or more rows than a batch holds
                refused.append((delivery, self._failure(entry.id, ErrorKind.BAD_INPUT, str(exc))))
        if refused:
            self._send_replies(refused, batch_size=0)
            self._task_events(f"{len(refused)} requests refused", now, now, refused)
        self._schedule()

    def _policy(self, key: Hashable) -> BatchPolicy:
        name, version = cast(tuple[str, str], key)
        meta = self.repository.get(name, version).metadata
        return BatchPolicy(
            max_batch_size=meta.max_batch_size or self.settings.max_batch_size,
            max_delay_ms=meta.max_delay_ms if meta.max_delay_ms is not None else self.settings.max_delay_ms,
            idle_ms=meta.batch_idle_ms if meta.batch_idle_ms is not None else self.settings.batch_idle_ms,
        )

    # -- timers --------------------------------------------------------------------------

    def _schedule(self) -> None:
        wakeup = self.collector.next_wakeup()
        if wakeup is None:
            self._cancel_wakeup()
            return
        if self._wakeup_at is not None and self._wakeup_at <= wakeup:
            return
        self._cancel_wakeup()
        self._wakeup_at = wakeup
        self._wakeup = self._timer.call_after(max(0.0, wakeup - time.monotonic()), self._on_wakeup)

    def _cancel_wakeup(self) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._wakeup = self._wakeup_at = None

    def _on_wakeup(self) -> None:
        self._wakeup = self._wakeup_at = None
        for batch in self.collector.due(time.monotonic()):
            self._run(batch)
        self._schedule()

    # -- the forward pass ----------------------------------------------------------------

    def _run(self, batch: Batch[Pending]) -> None:
        """One forward for the batch; every request gets its own reply."""
        name, version = cast(tuple[str, str], batch.key)
        model = self.repository.get(name, version)
        now = time.monotonic()
        replies: list[tuple[Delivery, Reply]] = []
        live: list[tuple[Pending, dict[str, np.ndarray]]] = []
        expired = 0
        for p in batch.items:
            if p.deadline <= now:  # its client has been answered 504
                message = "deadline passed before the request was computed"
                replies.append((p.delivery, self._failure(p.item.id, ErrorKind.EXPIRED, message)))
                expired += 1
            else:
                live.append((p, decode_inputs(p.item)))
        rows = sum(p.item.rows for p, _ in live)
        forwards: list[Forward] = []
        if live:
            try:
                results, forward = self._forward(model, live, rows)
                replies += results
                forwards.append(forward)
            except Exception:  # one forward failed: find the culprit, serve the rest
                log.exception("node %s: batch of %d rows for %s failed; retrying one by one", self.node_id, rows, name)
                for p, arrays in live:
                    try:
                        results, forward = self._forward(model, [(p, arrays)], rows)
                        replies += results
                        forwards.append(forward)
                    except InputError as exc:
                        replies.append((p.delivery, self._failure(p.item.id, ErrorKind.BAD_INPUT, str(exc))))
                    except Exception as exc:
                        failed = f"inference failed: {exc}"
                        replies.append((p.delivery, self._failure(p.item.id, ErrorKind.INFERENCE_FAILED, failed)))
        counts = None
        if self.settings.metrics and forwards:
            waits = [now - p.delivery.received for p, _ in live]
            counts = batch_counts(name, version, forwards, waits)
        self._send_replies(replies, batch_size=rows, expired=expired, counts=counts)
        arrived = min(p.delivery.received for p in batch.items)
        self._task_events(f"{len(batch.items)} requests, {rows} rows of {name}/{version}", arrived, now, replies)

    def _task_events(self, what: str, arrived: float, started: float, replies: list[tuple[Delivery, Reply]]) -> None:
        """Flower's view of one batch (or of requests refused at once): one task, if task events are on."""
        if self._events is not None:
            failures = Counter(r.kind.wire for _, r in replies if isinstance(r, Failure))
            self._events.batch(what, arrived, started, failures)

    def _forward(
        self, model: Model, live: list[tuple[Pending, dict[str, np.ndarray]]], batch_rows: int
    ) -> tuple[list[tuple[Delivery, Reply]], Forward]:
        """One forward pass over ``live``: each request's result, and what the pass did (for /metrics)."""
        inputs = {
            spec.name: np.concatenate([arrays[spec.name] for _, arrays in live])
            if len(live) > 1
            else live[0][1][spec.name]
            for spec in model.metadata.inputs
        }
        started = time.perf_counter()
        outputs = model.forward(inputs)
        forward = Forward(sum(p.item.rows for p, _ in live), len(live), time.perf_counter() - started)
        replies: list[tuple[Delivery, Reply]] = []
        start = 0
        for p, _ in live:
            stop = start + p.item.rows
            outs = encode_outputs(model, outputs, start, stop)
            replies.append((p.delivery, Result(p.item.id, self.node_id, batch_rows, model.version, outs)))
            start = stop
        return replies, forward

    def _failure(self, item_id: str, kind: ErrorKind, message: str) -> Failure:
        return Failure(item_id, self.node_id, kind, message)

    def _send_replies(
        self,
        replies: list[tuple[Delivery, Reply]],
        batch_size: int,
        expired: int = 0,
        counts: Counter[str] | None = None,
    ) -> None:
        """One pipeline: a blob per gateway, its expiry, the batch-size statistic and the batch's metrics."""
        by_gateway: dict[str, list[Reply]] = defaultdict(list)
        for delivery, reply in replies:
            by_gateway[delivery.reply_to].append(reply)
        pipe = self.redis.pipeline(transaction=False)
        for reply_to, blob in by_gateway.items():
            pipe.rpush(reply_to, encode_replies(blob))
            pipe.expire(reply_to, self.settings.reply_ttl_s)
        if batch_size:
            pipe.hincrby(STATS_BATCHES_KEY, str(batch_size), 1)
        if expired:
            pipe.hincrby(STATS_EXPIRED_KEY, self.node_id, expired)
        for field, n in (counts or {}).items():
            pipe.hincrby(METRICS_KEY, field, n)
        try:
            pipe.execute()
        except RedisError as exc:
            log.error("node %s: could not deliver %d results: %s", self.node_id, len(replies), exc)
        for delivery, _ in replies:
            delivery.answered()


class InferTask(Task):  # type: ignore[misc]
    """The task the gateway sends; served by :class:`Server`'s strategy, not per message."""

    name = TASK_NAME
    typing = False

    def __init__(self, server: Server) -> None:
        self.server = server

    def Strategy(self, task: Task, app: Celery, consumer: Any) -> Callable[..., None]:  # noqa: N802
        return self.server.start(consumer)

    def run(self, envelope: dict[str, Any]) -> None:
        raise RuntimeError(f"{TASK_NAME} is served in batches by a ringserve worker, not called directly")


class Consumer(celery.worker.consumer.Consumer):  # type: ignore[misc]
    """Celery's consumer, with two changes.

    It counts the messages whose body it cannot decode among our drops. And it reconnects to
    the broker every :data:`RECONNECT_S` while it is down: Celery's own loop waits 2 s, then
    4 s, 6 s… between attempts, so a worker would rejoin the ring seconds after Redis is back.
    """

    def ensure_connected(self, conn: Any) -> Any:
        attempts = itertools.count()

        def retrying(exc: Exception, interval: float) -> None:
            if next(attempts) % 40 == 0:  # once every 10 s
                log.warning("broker unreachable (%s); trying again every %.2f s", exc, interval)

        conn = conn.ensure_connection(
            retrying,
            None,  # forever: a worker outlives any Redis outage (Celery's 100 tries last 25 s here)
            interval_start=RECONNECT_S,
            interval_step=0,
            interval_max=RECONNECT_S,
            callback=maybe_shutdown,
        )
        self.first_connection_attempt = False
        self.broker_connection_retry_attempt = 0
        return conn

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        DROPS.drop("task messages whose body does not decode", f"{type(exc).__name__}: {exc}")
        super().on_decode_error(message, exc)


def install_worker(app: Celery, settings: Settings) -> Server:
    """Make ``app`` a ringserve worker: register the task and the step that stops it."""
    server = Server(settings)
    app.register_task(InferTask(server))

    class Serving(bootsteps.StartStopStep):  # type: ignore[misc]
        """Runs after the task consumer started; on stop, leaves the ring and drains."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def stop(self, parent: Any) -> None:
            server.stop()

        def shutdown(self, parent: Any) -> None:
            server.stop()

    app.steps["consumer"].add(Serving)
    # Celery refuses (and logs) messages that name no task we know, that it may not take or
    # whose body it cannot decode; they count among what this worker dropped.
    app.conf.worker_consumer = f"{Consumer.__module__}:{Consumer.__qualname__}"
    signals.task_unknown.connect(lambda **kw: DROPS.drop("messages of unknown tasks", str(kw.get("name"))), weak=False)
    signals.task_rejected.connect(lambda **kw: DROPS.drop("messages Celery rejected", str(kw.get("exc"))), weak=False)
    return server
