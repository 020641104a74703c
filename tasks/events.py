"""Celery task events for the batch consumer's work, so that Flower lists it.

Celery's own strategy sends a task's events as it runs it; ours (:mod:`tasks.consumer`) batches
the requests of many messages instead, so it sends them itself, through the worker's own event
dispatcher (``consumer.event_dispatcher``), with Celery's event types and the fields Flower reads.

One task is one batch, the unit of work of a worker: ``task-received`` stamped when its first
request arrived, ``task-started`` when its forward pass began, then ``task-succeeded`` with its
``runtime`` (forward pass and replies) when every request got its result, or ``task-failed``
naming the kinds of error the others got.

A task per batch, not per message, because every event costs: Flower 70–90 µs of CPU to take in,
whatever the message it came in (measured by ``python -m bench.metrics_cost``), and the medium
bench carried 1.9 requests per message but 7.5 per batch. And the events travel
:data:`EVENTS_PER_MESSAGE` to a message because each publish costs the worker about 200 µs (kombu):
a batch's events cost it 220–250 µs published alone, about 50 µs published 24 at a time. So the worker holds
them until it has 24, or for :data:`HOLD_S` at most (its timer calls :meth:`TaskEvents.flush`), then
hands them to the dispatcher, which publishes what it gets in one turn of the event loop as one
``task.multi`` message; Flower's receiver unpacks it. Each event carries the time it happened, so
holding it changes nothing Flower shows but when. Events are best effort, like Celery's: those held
when a worker is killed are lost.

``args`` says how many requests and rows of which model version; inputs, outputs and reply lists
never travel in events. ``kwargs`` does not travel at all: a batch has none, and Flower 2.2 parses a
task's ``kwargs`` with ``ast.literal_eval`` each time one of its events arrives, so Celery's ``"{}"``
would cost it 25-30 % of its CPU per event (``python -m bench.metrics_cost`` measures it).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from tasks.contract import TASK_NAME

Send = Callable[..., Any]  # EventDispatcher.send(type, **fields)
EVENTS_PER_MESSAGE = 24  # the events handed over together: Celery's buffer_limit, one task.multi message
HOLD_S = 0.25  # the longest an event is held


class TaskEvents:
    """Sends each batch's task events through ``send`` (the worker's ``EventDispatcher.send``), in groups."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: list[tuple[str, dict[str, Any]]] = []

    def flush(self) -> None:
        """Hand every held event to the dispatcher (the worker's timer, every HOLD_S, and at a stop)."""
        held, self._held = self._held, []
        for kind, fields in held:
            self._send(kind, **fields)

    def batch(self, what: str, arrived: float, started: float, failures: Counter[str]) -> None:
        """One batch is answered: ``what`` it held (Flower's args), when its first request arrived and
        when its forward began (``time.monotonic()``), and how many requests got which kind of error."""
        task = str(uuid.uuid4())
        now, wall = time.monotonic(), time.time()
        received: dict[str, Any] = {
            "uuid": task,
            "name": TASK_NAME,
            "args": what,  # and no "kwargs" (see above)
            "root_id": task,
            "parent_id": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timestamp": wall - (now - arrived),
        }
        ended: tuple[str, dict[str, Any]] = ("task-succeeded", {"result": "", "runtime": now - started})
        if failures:
            errors = ", ".join(f"{kind} x{n}" for kind, n in sorted(failures.items()))
            ended = ("task-failed", {"exception": f"RequestsFailed('{errors}')", "traceback": ""})
        self._held += [
            ("task-received", received),
            ("task-started", {"uuid": task, "timestamp": wall - (now - started)}),
            (ended[0], {"uuid": task, "timestamp": wall, **ended[1]}),
        ]
        if len(self._held) >= EVENTS_PER_MESSAGE:
            self.flush()
