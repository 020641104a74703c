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

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np
from celery import Celery, Task, bootsteps
from redis import Redis
from redis.exceptions import RedisError

from hashing.membership import Member, Membership
from tasks.batching import Batch, BatchPolicy, Collector
from tasks.contract import (
    DATATYPES,
    STATS_BATCHES_KEY,
    STATS_EXPIRED_KEY,
    TASK_NAME,
    node_id_from_hostname,
    queue_name,
)
from tasks.engine import InputError, Model
from tasks.repository import Repository, UnknownModelError
from tasks.settings import Settings

log = logging.getLogger(__name__)

Reply = dict[str, Any]


class BadItem(ValueError):
    """A request the worker cannot decode; it gets a 400 reply of its own."""


@dataclass
class Envelope:
    """One Celery message: acknowledged once each of its requests has been answered."""

    reply_to: str
    unanswered: int
    ack: Callable[[], None]

    def answered(self, n: int = 1) -> None:
        self.unanswered -= n
        if self.unanswered == 0:
            self.ack()


@dataclass
class Pending:
    item: dict[str, Any]
    envelope: Envelope


def decode_inputs(item: dict[str, Any]) -> dict[str, np.ndarray]:
    """The item's tensors as arrays; the gateway validated them, so this only guards."""
    try:
        arrays = {}
        for name, datatype, shape, data in item["inputs"]:
            arrays[name] = np.frombuffer(data, dtype=DATATYPES[datatype].numpy).reshape(shape)
        return arrays
    except (KeyError, TypeError, ValueError) as exc:
        raise BadItem(f"malformed input tensor: {exc}") from None


def encode_outputs(model: Model, outputs: dict[str, np.ndarray], start: int, stop: int) -> list[list[Any]]:
    tensors = []
    for spec in model.metadata.outputs:
        part = np.ascontiguousarray(outputs[spec.name][start:stop])
        tensors.append([spec.name, spec.datatype, list(part.shape), part.tobytes()])
    return tensors


class Server:
    """One worker's serving state: its models, its collector, its place in the ring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.repository = Repository(settings.model_repository)
        self.redis = Redis.from_url(settings.redis_url)
        self.membership = Membership(self.redis, settings.member_ttl_ms)
        self.member = Member(settings.node_weight, uuid.uuid4().hex)
        self.collector: Collector[Pending] = Collector(self._policy)
        self._timer: Any = None
        self._wakeup: Any = None
        self._wakeup_at: float | None = None
        self._heartbeat: Any = None
        self._connection_errors: tuple[type[BaseException], ...] = ()
        self._loaded = False

    # -- life cycle ----------------------------------------------------------------------

    def start(self, consumer: Any) -> Callable[..., None]:
        """Called by Celery when the worker (re)connects; returns the message handler."""
        self.node_id = self.settings.node_id or node_id_from_hostname(consumer.hostname)
        own_queue = queue_name(self.node_id)
        if own_queue not in consumer.app.amqp.queues:
            log.warning("node %s does not consume %s: start it with -Q %s", self.node_id, own_queue, own_queue)
        if not self._loaded:
            started = time.perf_counter()
            self.repository.load_all()
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
        self._timer = consumer.timer
        self._connection_errors = consumer.connection_errors
        self._announce()
        self._heartbeat = self._timer.call_repeatedly(self.settings.heartbeat_ms / 1000, self._announce)
        log.info("node %s: serving %s", self.node_id, own_queue)
        return self.on_message

    def stop(self) -> None:
        """Leave the ring first, then answer everything still held."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        try:
            self.membership.leave(self.node_id)
            log.info("node %s: left the ring", self.node_id)
        except RedisError as exc:
            log.warning("node %s: could not leave the ring (%s); it will expire", self.node_id, exc)
        self._cancel_wakeup()
        for batch in self.collector.drain():
            self._run(batch)

    def _announce(self) -> None:
        try:
            self.membership.announce(self.node_id, self.member)
        except RedisError as exc:
            log.warning("node %s: heartbeat failed: %s", self.node_id, exc)

    # -- messages ------------------------------------------------------------------------

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        """Celery's strategy signature; ``ack`` is the worker's acknowledge promise."""
        args, _kwargs, _embed = message.decode()
        envelope_body = args[0]
        items = envelope_body.get("items") or []
        envelope = Envelope(
            reply_to=envelope_body["reply_to"],
            unanswered=len(items),
            ack=lambda: ack(log, self._connection_errors),
        )
        if not items:
            envelope.ack()
            return
        now = time.monotonic()
        errors: list[tuple[Pending, int, str]] = []
        for item in items:
            pending = Pending(item, envelope)
            try:
                key = (item["model"], item["version"])
                rows = int(item["inputs"][0][2][0])
                for batch in self.collector.add(key, pending, rows, now):
                    self._run(batch)
            except UnknownModelError as exc:
                errors.append((pending, 404, str(exc)))
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                errors.append((pending, 400, f"malformed request: {exc}"))
        if errors:
            self._send_replies([(p, self._error(p, status, msg)) for p, status, msg in errors], batch_size=0)
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
        now_ms = time.time() * 1000
        replies: list[tuple[Pending, Reply]] = []
        live: list[tuple[Pending, dict[str, np.ndarray]]] = []
        expired = 0
        for p in batch.items:
            if p.item.get("deadline_ms", now_ms + 1) <= now_ms:  # its client has been answered 504
                replies.append((p, self._error(p, 504, "deadline passed before the request was computed")))
                expired += 1
                continue
            try:
                live.append((p, decode_inputs(p.item)))
            except BadItem as exc:
                replies.append((p, self._error(p, 400, str(exc))))
        rows = sum(next(iter(arrays.values())).shape[0] for _, arrays in live)
        if live:
            try:
                replies += self._forward(model, live, rows)
            except Exception:  # one forward failed: find the culprit, serve the rest
                log.exception("node %s: batch of %d rows for %s failed; retrying one by one", self.node_id, rows, name)
                for p, arrays in live:
                    try:
                        replies += self._forward(model, [(p, arrays)], rows)
                    except InputError as exc:
                        replies.append((p, self._error(p, 400, str(exc))))
                    except Exception as exc:
                        replies.append((p, self._error(p, 500, f"inference failed: {exc}")))
        self._send_replies(replies, batch_size=rows, expired=expired)

    def _forward(
        self, model: Model, live: list[tuple[Pending, dict[str, np.ndarray]]], batch_rows: int
    ) -> list[tuple[Pending, Reply]]:
        inputs = {
            spec.name: np.concatenate([arrays[spec.name] for _, arrays in live])
            if len(live) > 1
            else live[0][1][spec.name]
            for spec in model.metadata.inputs
        }
        outputs = model.forward(inputs)
        replies = []
        start = 0
        for p, arrays in live:
            stop = start + next(iter(arrays.values())).shape[0]
            replies.append(
                (
                    p,
                    {
                        "id": p.item["id"],
                        "node": self.node_id,
                        "batch_size": batch_rows,
                        "version": model.version,
                        "outputs": encode_outputs(model, outputs, start, stop),
                    },
                )
            )
            start = stop
        return replies

    def _error(self, p: Pending, status: int, message: str) -> Reply:
        return {"id": p.item.get("id"), "node": self.node_id, "status": status, "error": message}

    def _send_replies(self, replies: list[tuple[Pending, Reply]], batch_size: int, expired: int = 0) -> None:
        """One pipeline: a blob per gateway, its expiry, and the batch-size statistic."""
        by_gateway: dict[str, list[Reply]] = defaultdict(list)
        for p, reply in replies:
            by_gateway[p.envelope.reply_to].append(reply)
        pipe = self.redis.pipeline(transaction=False)
        for reply_to, blob in by_gateway.items():
            pipe.rpush(reply_to, msgpack.packb(blob))
            pipe.expire(reply_to, self.settings.reply_ttl_s)
        if batch_size:
            pipe.hincrby(STATS_BATCHES_KEY, str(batch_size), 1)
        if expired:
            pipe.hincrby(STATS_EXPIRED_KEY, self.node_id, expired)
        try:
            pipe.execute()
        except RedisError as exc:
            log.error("node %s: could not deliver %d results: %s", self.node_id, len(replies), exc)
        for p, _ in replies:
            p.envelope.answered()


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
    return server
