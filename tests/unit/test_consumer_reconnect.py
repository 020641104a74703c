"""The batch consumer's timers across a broker reconnect: fake consumer, fake timer, fake clock.

Celery calls a task's Strategy (:meth:`Server.start`) again whenever the worker reconnects to
the broker; these tests drive it the way celery-batches' ``t/unit/test_strategy.py`` drives
``Strategy()``. Whether a wake-up scheduled on the old connection survives depends on the
Celery version: up to 5.6 ``Consumer.on_close`` cleared the timer; 5.7 keeps the timer, and
cancels only the entries registered while (re)connecting. The server has to be right either
way: a partial batch waiting for its wake-up when the connection dropped, and every partial
batch after it, must be flushed on time, not when it fills.

No Redis, no Celery worker: ``tasks.consumer``'s ``Redis`` and ``time`` are replaced by fakes.
"""

from __future__ import annotations

import heapq
import itertools
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from celery import Celery

from tasks import consumer
from tasks.celery_app import make_celery
from tasks.consumer import install_worker
from tasks.contract import TASK_NAME, Item, Tensor, decode_replies, encode_envelope, queue_name, reply_key
from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
NODE = "worker_1"
MAX_DELAY_MS = 20  # the oldest request of a partial batch waits at most this long
IDLE_MS = 2


class FakeClock:
    """Stands in for the ``time`` module inside :mod:`tasks.consumer`; seconds, set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


@dataclass
class Entry:
    """A timer entry, like kombu's: cancelling it means it never fires."""

    fun: Callable[[], None]
    every_s: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeTimer:
    """The part of kombu's ``Timer`` that the server uses, run by hand on a :class:`FakeClock`."""

    clock: FakeClock
    queue: list[tuple[float, int, Entry]] = field(default_factory=list)
    order: Iterator[int] = field(default_factory=itertools.count)

    def call_after(self, secs: float, fun: Callable[[], None]) -> Entry:
        entry = Entry(fun)
        heapq.heappush(self.queue, (self.clock.now + secs, next(self.order), entry))
        return entry

    def call_repeatedly(self, secs: float, fun: Callable[[], None]) -> Entry:
        entry = Entry(fun, every_s=secs)
        heapq.heappush(self.queue, (self.clock.now + secs, next(self.order), entry))
        return entry

    def clear(self) -> None:
        """What Celery <= 5.6 did to the consumer's timer on a lost connection."""
        self.queue.clear()

    def live(self) -> list[Entry]:
        return [e for _, _, e in self.queue if not e.cancelled]

    def run_until(self, until: float) -> None:
        """Advance the clock to ``until``, firing every entry that falls due on the way."""
        while self.queue and self.queue[0][0] <= until:
            due, _, entry = heapq.heappop(self.queue)
            if entry.cancelled:
                continue
            self.clock.now = max(self.clock.now, due)
            entry.fun()
            if entry.every_s is not None:
                heapq.heappush(self.queue, (due + entry.every_s, next(self.order), entry))
        self.clock.now = until


class FakePipeline:
    def __init__(self, log: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._log = log
        self._queued: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, command: str) -> Callable[..., FakePipeline]:
        def queue(*args: Any, **_: Any) -> FakePipeline:
            self._queued.append((command, args))
            return self

        return queue

    def execute(self) -> list[None]:
        self._log.extend(self._queued)
        done, self._queued = self._queued, []
        return [None] * len(done)


class FakeRedis:
    """Records what the worker writes; every worker write goes through a pipeline."""

    log: list[tuple[str, tuple[Any, ...]]] = []

    @classmethod
    def from_url(cls, url: str) -> FakeRedis:
        return cls()

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(FakeRedis.log)

    def info(self, section: str = "") -> dict[str, str]:
        return {"run_id": "fake"}

    def __getattr__(self, command: str) -> Callable[..., None]:
        """Any other command is recorded and answers None."""

        def record(*args: Any, **_: Any) -> None:
            FakeRedis.log.append((command, args))

        return record


def fake_consumer(timer: FakeTimer) -> SimpleNamespace:
    """What :meth:`Server.start` reads of Celery's consumer."""
    channel = SimpleNamespace(queue_purge=lambda name: 0)
    return SimpleNamespace(
        hostname=f"{NODE}@test",
        app=SimpleNamespace(amqp=SimpleNamespace(queues={queue_name(NODE): None})),
        connection=SimpleNamespace(default_channel=channel),
        connection_errors=(ConnectionError,),
        timer=timer,
        event_dispatcher=None,
    )


@dataclass
class Message:
    """A task message of one digits request; ``acked`` once its request was answered."""

    request_id: str
    acked: bool = False

    def decode(self) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        pixels = Tensor("pixels", "FP32", (1, 64), np.zeros((1, 64), dtype=np.float32).tobytes())
        item = Item(self.request_id, "digits", "1", 10_000.0, (pixels,))
        return [encode_envelope(reply_key("gw"), [item])], {}, {}

    def ack(self, logger: Any, errors: Any) -> None:
        self.acked = True


def deliver(handler: Callable[..., None], message: Message) -> None:
    handler(message, None, message.ack, None, [])


def answered_ids() -> list[str]:
    """Ids of the requests whose replies were pushed to the gateway's list."""
    ids = []
    for command, args in FakeRedis.log:
        if command == "rpush":
            replies, _ = decode_replies(args[1])
            ids += [r.id for r in replies]
    return ids


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(consumer, "time", fake)
    monkeypatch.setattr(consumer, "Redis", FakeRedis)
    monkeypatch.setattr(FakeRedis, "log", [])
    return fake


@pytest.fixture
def app(clock: FakeClock, tmp_path: Path) -> Celery:
    """A worker's Celery app, as ``celery -A tasks worker`` builds it (never connected)."""
    shutil.copytree(ROOT / "models" / "digits", tmp_path / "digits")  # the small model only
    settings = Settings(
        redis_url="redis://fake",
        model_repository=str(tmp_path),
        max_delay_ms=MAX_DELAY_MS,
        batch_idle_ms=IDLE_MS,
        heartbeat_ms=1000,
    )
    app = make_celery(settings)
    install_worker(app, settings)
    return app


def strategy(app: Celery, consumer_: SimpleNamespace) -> Callable[..., None]:
    """What Celery's ``Tasks`` consumer step does on every (re)connect: ask for the handler."""
    task = app.tasks[TASK_NAME]
    handler: Callable[..., None] = task.Strategy(task, app, consumer_)
    return handler


def reconnect(app: Celery, old: SimpleNamespace, new: SimpleNamespace) -> Callable[..., None]:
    """What Celery's consumer does when the broker connection drops (``Consumer.start``).

    ``blueprint.restart`` calls ``stop`` on every consumer step (ours among them), ``on_close``
    disposes of the old connection, and the steps start again: the ``Tasks`` step calls the
    Strategy with the consumer as it now is.
    """
    for step_class in app.steps["consumer"]:
        step_class(old).stop(old)
    return strategy(app, new)


def test_a_partial_batch_is_flushed_after_its_wait(app: Celery, clock: FakeClock) -> None:
    """The baseline, without a reconnect: a lone request leaves after the idle gap."""
    timer = FakeTimer(clock)
    handler = strategy(app, fake_consumer(timer))
    m = Message("r1")
    deliver(handler, m)
    timer.run_until(clock.now + (IDLE_MS - 0.5) / 1000)
    assert answered_ids() == []
    timer.run_until(clock.now + 0.5 / 1000)
    assert m.acked and answered_ids() == ["r1"]


@pytest.mark.parametrize("old_timer", ["cleared", "kept"])
def test_partial_batches_are_flushed_on_time_after_a_reconnect(app: Celery, clock: FakeClock, old_timer: str) -> None:
    """A wake-up pending when the connection drops does not hold up the batches after it.

    ``cleared``: the old connection's timer entries are gone (Celery <= 5.6 cleared the timer
    in ``on_close``; a new timer is the same); ``kept``: they stay (Celery 5.7). The request
    held when the connection dropped is answered at the reconnect (the worker drains what it
    holds when its consumer stops); the lone request after it leaves after its idle gap, not
    when its batch fills.
    """
    timer = FakeTimer(clock)
    old = fake_consumer(timer)
    handler = strategy(app, old)
    before = Message("before")
    deliver(handler, before)  # a partial batch; its wake-up is due in IDLE_MS
    assert answered_ids() == []

    clock.now += 0.001  # the connection drops within the idle gap
    if old_timer == "cleared":
        timer.clear()
    handler = reconnect(app, old, fake_consumer(timer))
    at_reconnect = answered_ids()

    after = Message("after")
    deliver(handler, after)
    received = clock.now
    timer.run_until(received + (IDLE_MS - 0.5) / 1000)
    early = answered_ids()
    timer.run_until(received + IDLE_MS / 1000)
    answered = answered_ids()
    print(f"old timer {old_timer}: answered {at_reconnect} at the reconnect, {answered} {IDLE_MS} ms after 'after'")
    assert "after" in answered and after.acked, "a partial batch waited past its wake-up"
    assert "after" not in early, "a partial batch left before its wait was over"
    assert at_reconnect == ["before"] and before.acked, "the held request was not answered at the reconnect"
