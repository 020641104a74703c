"""Route requests over the ring and send them to the workers' queues, many per Celery message.

Request threads route a :class:`Call` (:mod:`app.routing`), enqueue it and wait on it. One
sender thread per gateway process takes everything that queued up since its last send and
sends one Celery message per worker, all in one Redis round trip. Under load a message
carries many requests, so the per-message cost is paid once per batch, not once per
request; when idle, a lone request leaves at once. Messages are built from a template
(:func:`tasks.contract.encode_task_message`) and pushed with ``LPUSH``, as kombu would.

The dispatcher remembers which worker holds each unanswered call. When a worker leaves the
ring (stopped or crashed), its unanswered calls are sent again to their new owners; a late
answer from the old owner finds no waiting call and is dropped, so no answer is given twice.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from app.errors import DeadlineExceeded, RingserveError, Unavailable
from app.routing import Lease, Router
from app.schemas import Tensor
from hashing.membership import Member
from tasks.contract import (
    GATEWAY_LOAD_PREFIX,
    GATEWAYS_KEY,
    STATS_ROUTED_KEY,
    STATS_SPILLED_KEY,
    Failure,
    Item,
    Reply,
    decode_counts,
    encode_envelope,
    encode_task_message,
    gateway_load_key,
    queue_name,
    reply_key,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_S = 0.1  # how often requests that could not be published are tried again
MESSAGE_BYTES = 4 * 1024 * 1024  # one message's tensor bytes; a single larger request travels alone
LOAD_REPORT_S = 0.1  # how often, while requests are in flight, this process publishes their rows per node
LOAD_REPORT_TTL_MS = 300  # a process that stops reporting drops out of the sum after this

# A load report in one round trip (three before: the report, the set of reporters, their reports):
# replace this process's rows in flight per node, then count the other processes whose report still
# lives, pruning the set of those whose report expired. The reports' keys are found from the set, so
# the script reads keys it was not given: fine on one Redis, not on a cluster (ringserve uses no cluster).
# KEYS: the reporters' set, our report; ARGV: our id, the report's ttl (ms), the reports' key prefix,
# then node, rows, ... (none: withdraw our report).
REPORT_LOAD_LUA = """
redis.call('DEL', KEYS[2])
if #ARGV > 3 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('SADD', KEYS[1], ARGV[1])
end
local others = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[3] .. id) == 0 then
    redis.call('SREM', KEYS[1], id)
  elseif id ~= ARGV[1] then
    others = others + 1
  end
end
return others
"""


def live_reports(redis: Redis, ids_key: str, report_key: Callable[[str], str]) -> list[tuple[str, dict[bytes, bytes]]]:
    """The expiring hash each gateway process in the set ``ids_key`` reports, by process id, for those
    whose report still lives; the others leave the set. Raises RedisError."""
    ids: list[bytes] = sorted(redis.smembers(ids_key))  # type: ignore[arg-type]
    pipe = redis.pipeline(transaction=False)
    for gateway_id in ids:
        pipe.hgetall(report_key(gateway_id.decode(errors="replace")))
    reports = pipe.execute()
    gone = [i for i, report in zip(ids, reports, strict=True) if not report]
    if gone:
        redis.srem(ids_key, *gone)
    return [(i.decode(errors="replace"), report) for i, report in zip(ids, reports, strict=True) if report]


def reported_rows(redis: Redis) -> Counter[str]:
    """Rows in flight per worker, summed over the gateway processes that reported in the last
    LOAD_REPORT_TTL_MS. Raises RedisError."""
    total: Counter[str] = Counter()
    for _, load in live_reports(redis, GATEWAYS_KEY, gateway_load_key):
        total.update(decode_counts(load))
    return total


def take_waiting(q: queue.SimpleQueue[T | None], timeout_s: float | None = None) -> list[T] | None:
    """Everything in ``q`` now, waiting up to ``timeout_s`` for the first ([] if none came); None: the
    stop marker (None) came first. A marker found after the first is put back for the next call."""
    try:
        first = q.get(timeout=timeout_s)
    except queue.Empty:
        return []
    if first is None:
        return None
    taken = [first]
    while True:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            return taken
        if nxt is None:
            q.put(None)
            return taken
        taken.append(nxt)


@dataclass(eq=False)
class Lookup:
    """A response-cache lookup (:mod:`app.cache`) that rides with the call(s) of one request.

    The sender makes it in its cycle, before it sends anything of that request, every lookup of
    the cycle in one round trip: the request thread hands over once, as it does without a cache.
    ``found`` is what the entry held (an answer, or another request's lock); then the calls are
    not sent and wake their thread at once. Nothing found means the lock is now ours: the calls
    are sent. An error is a miss, kept for the cache to count.
    """

    digest: str
    lock: bytes
    hit: str  # the counter a found answer adds to: "hits", or "coalesced" after following a leader
    done: bool = False
    found: bytes | None = None
    error: Exception | None = None


def held_lock() -> threading.Lock:
    """A lock taken at once: its release is the signal a waiting request thread wakes on. A bare lock
    is all C, where ``threading.Event`` builds a condition and a waiter lock in Python per wait."""
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass
class Call:
    """One request in flight; the request thread waits on it."""

    id: str
    key: str
    model: str
    version: str
    tensors: list[Tensor]
    deadline: float  # time.monotonic() of this process
    floor_rows: int  # one batch of its model: bounded loads engage only above it
    position: int | None = None  # rows of a sharded table: the ring position they are routed by
    lease: Lease | None = None  # the worker it was sent to, while it holds it
    lookup: Lookup | None = None  # the response cache's, made before the call is sent
    reply: Reply | None = None  # the worker's answer
    error: RingserveError | None = None  # or the gateway's own verdict
    _done: threading.Lock = field(default_factory=held_lock, repr=False)

    @property
    def node(self) -> str | None:
        return None if self.lease is None else self.lease.node

    @property
    def rows(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(len(t.data) for t in self.tensors)

    def item(self, now: float) -> Item:
        """The wire item: the time left is sent, never a clock reading."""
        return Item(self.id, self.model, self.version, (self.deadline - now) * 1000, tuple(self.tensors))

    @property
    def found_in_cache(self) -> bool:
        """Its lookup found an entry, so it was not sent: the thread waiting on it reads the lookup."""
        return self.lookup is not None and self.lookup.found is not None

    def wait(self, timeout_s: float) -> bool:
        """Block until the call is answered (True) or ``timeout_s`` passed (False)."""
        return self._done.acquire(timeout=timeout_s)

    def resolve(self, reply: Reply) -> None:
        self.reply = reply
        self._finish()

    def fail(self, error: RingserveError) -> None:
        self.error = error
        self._finish()

    def end_in_cache(self) -> None:
        """Its lookup found an entry: it ends unsent, and its thread reads the lookup."""
        self._finish()

    def _finish(self) -> None:
        try:
            self._done.release()
        except RuntimeError:  # answered already: the first answer stands
            pass


def chunks(calls: list[Call], max_bytes: int) -> list[list[Call]]:
    """``calls`` in order, cut into messages of at most ``max_bytes`` tensor bytes (a larger call alone)."""
    out: list[list[Call]] = []
    size = 0
    for call in calls:
        if not out or size + call.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(call)
        size += call.nbytes
    return out


class Dispatcher:
    def __init__(self, redis: Redis, router: Router, queue_grace_s: float, message_bytes: int = MESSAGE_BYTES) -> None:
        self.gateway_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.reply_key = reply_key(self.gateway_id)
        self.router = router
        self._redis = redis
        self._outbox: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._pending: dict[str, Call] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ringserve-sender", daemon=True)
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"  # as Celery names a sending process
        self._broker_down = False  # the last publish failed: log once, not at every retry
        self._load_key = gateway_load_key(self.gateway_id)
        self._report = redis.register_script(REPORT_LOAD_LUA)
        self._load_reported_at = 0.0
        self._load_reported: dict[str, int] = {}
        self._queue_grace_ms = int(queue_grace_s * 1000)
        self._message_bytes = message_bytes
        self._members: set[str] = set()
        self.refused_for_memory = 0  # requests answered 503 because Redis was full
        self._resent: Counter[str] = Counter()  # requests sent again, by cause (under _lock; for /metrics)
        # The response cache's lookups, made in one round trip; sets each one's done, found or error.
        self.look: Callable[[list[Lookup]], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._outbox.put(None)
        self._thread.join()
        try:  # our rows are no longer in flight anywhere: do not let others count them
            self._redis.delete(self._load_key)
        except RedisError as exc:
            log.debug("sender: load report not withdrawn: %s", exc)

    @property
    def alive(self) -> bool:
        """The sender thread runs (an unexpected error would have ended it)."""
        return self._thread.is_alive()

    def in_flight(self) -> int:
        return len(self._pending)

    def pending_per_model(self) -> Counter[tuple[str, str]]:
        """Calls awaiting their answer, per (model, version): a request split over k shards counts k."""
        with self._lock:
            return Counter((c.model, c.version) for c in self._pending.values())

    def resent(self) -> Counter[str]:
        """Requests sent again so far, by cause: ``worker_left``, ``worker_silent``, ``redis_lost``."""
        with self._lock:
            return self._resent.copy()

    def submit(
        self,
        key: str,
        model: str,
        version: str,
        tensors: list[Tensor],
        deadline: float,
        floor_rows: int,
        position: int | None = None,
        lookup: Lookup | None = None,
    ) -> Call:
        """Route and queue one request (with the cache ``lookup`` to make first). Raises EmptyRingError
        or WorkerFull."""
        call_id = f"{self.gateway_id}:{next(self._ids)}"
        call = Call(call_id, key, model, version, tensors, deadline, floor_rows, position, lookup=lookup)
        call.lease = self.router.acquire(key, call.rows, floor_rows, position)
        with self._lock:
            self._pending[call.id] = call
        self._outbox.put(call)
        return call

    def forget(self, call: Call, worker_fault: bool) -> None:
        """The caller stopped waiting: its deadline passed with the call still unanswered.

        ``worker_fault``: the deadline was the server's own request timeout, so the worker held
        the request too long (a failure for its breaker). A client's shorter deadline says
        nothing about the worker.
        """
        with self._lock:
            known = self._pending.pop(call.id, None)
        if known is not None and known.lease is not None:
            self.router.release(known.lease, ok=False if worker_fault else None)

    def resolve(self, reply: Reply) -> None:
        """A worker's answer; answers nobody waits for are dropped (so none is given twice).

        The worker's breaker hears only what the answer says about the worker
        (:class:`ErrorKind`): its own failure counts against it; a result or a refused bad
        input shows it working; a skipped expired request says nothing.
        """
        with self._lock:
            call = self._pending.pop(reply.id, None)
        if call is None:
            return
        if call.lease is not None:
            self.router.release(call.lease, ok=reply.kind.verdict if isinstance(reply, Failure) else True)
        call.resolve(reply)

    def set_members(self, members: dict[str, Member]) -> None:
        """Follow membership; re-send what departed (or restarted) workers held, then let their
        queues expire after the grace period (a worker that comes back keeps its queue: its
        heartbeat removes the expiry)."""
        self._reroute(self.router.set_members(members), "left or restarted", "worker_left")
        departed, self._members = self._members - set(members), set(members)
        if departed and self._queue_grace_ms > 0:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for node in departed:
                    pipe.pexpire(queue_name(node), self._queue_grace_ms)
                pipe.execute()
            except RedisError as exc:
                log.debug("queues of %s not set to expire: %s", ", ".join(sorted(departed)), exc)

    def set_silent(self, nodes: set[str]) -> None:
        """Workers that missed their heartbeats (see :meth:`Router.set_silent`)."""
        self.router.set_silent(nodes)
        self._reroute_quiet()

    def _reroute_quiet(self) -> None:
        """Send what silent, quiet workers hold to the keys' next owners now, rather than when
        their announcements expire (a late answer is harmless)."""
        self._reroute(self.router.take_quiet(), "missed their heartbeats and stopped answering", "worker_silent")

    def _reroute(self, nodes: set[str], why: str, cause: str) -> None:
        if not nodes:
            return
        with self._lock:
            orphans = [c for c in self._pending.values() if c.node in nodes]
            self._resent[cause] += len(orphans)
        if orphans:
            log.warning("re-sending %d unanswered requests of %s (%s)", len(orphans), ", ".join(sorted(nodes)), why)
        for call in orphans:
            if call.lease is not None:
                self.router.release(call.lease, ok=None)
            try:
                call.lease = self.router.acquire(call.key, call.rows, call.floor_rows, call.position)
            except Exception as exc:  # no worker left, or all full: answer now
                call.lease = None
                self._fail([call], Unavailable(f"its worker {why} and no other can take it ({type(exc).__name__})"))
                continue
            self._outbox.put(call)

    def redis_lost(self) -> None:
        """Redis stopped answering: keep what is in flight; it is sent again when Redis is back.

        Each request still ends by its deadline (the waiting thread answers 504); new arrivals
        get a fast 503 meanwhile (:meth:`app.gateway.Gateway.infer`).
        """
        with self._lock:
            held = len(self._pending)
        if held:
            log.warning("Redis is unreachable: holding %d requests until it is back or their deadline passes", held)

    def redis_back(self, data_lost: bool) -> None:
        """Redis answers again; if it is a new server, what was queued or replied there is gone:
        send every request still waiting again (a duplicate answer is harmless: the first wins).
        """
        if not data_lost:
            return
        with self._lock:
            calls = list(self._pending.values())
            self._resent["redis_lost"] += len(calls)
        if calls:
            log.warning("Redis lost its data: sending %d waiting requests again", len(calls))
        for call in calls:
            self._outbox.put(call)

    def _take_back(self, call: Call) -> Call | None:
        """Stop tracking ``call`` and give its lease back, saying nothing about its worker; None if it was
        answered or abandoned already."""
        with self._lock:
            known = self._pending.pop(call.id, None)
        if known is not None and known.lease is not None:
            self.router.release(known.lease, ok=None)
        return known

    def _fail(self, calls: list[Call], error: RingserveError) -> None:
        """Answer ``calls`` with the gateway's own error; says nothing about their workers."""
        for call in calls:
            if (known := self._take_back(call)) is not None:
                known.fail(error)

    def _collect(self, timeout_s: float | None) -> list[Call] | None:
        """Everything queued now, waiting up to ``timeout_s`` for the first; None: stop."""
        return take_waiting(self._outbox, timeout_s)

    def _run(self) -> None:
        unsent: list[Call] = []  # Redis was unreachable: try again every RETRY_S until each deadline
        while True:
            wait_s = RETRY_S if unsent else LOAD_REPORT_S if self._pending or self._load_reported else None
            calls = self._collect(wait_s)
            if calls is None:
                return
            calls, unsent = unsent + calls, []
            try:
                unsent = self._send(calls)
                self._report_load()
                self._reroute_quiet()
            except Exception:  # the sender thread must survive anything
                log.exception("sender: unexpected error")
                self._fail(calls, Unavailable("the gateway could not queue the request"))

    def _report_load(self) -> None:
        """Every LOAD_REPORT_S while busy: publish this process's rows in flight per worker (for
        /stats and /metrics), and tell the router how many other gateway processes are busy: each
        keeps a worker within an equal part of one batch.
        """
        now = time.monotonic()
        if now - self._load_reported_at < LOAD_REPORT_S:
            return
        rows = self.router.rows_in_flight()
        if not rows and not self._load_reported:
            return
        self._load_reported_at = now
        args: list[str | int] = [self.gateway_id, LOAD_REPORT_TTL_MS, GATEWAY_LOAD_PREFIX]
        for node, n in rows.items():
            args += (node, n)
        try:
            others = self._report(keys=[GATEWAYS_KEY, self._load_key], args=args)
            self._load_reported = rows
            self.router.set_peers(int(others))
        except RedisError as exc:
            log.debug("sender: load not reported: %s", exc)

    def _look_up(self, lookups: list[Lookup]) -> None:
        """Make the cycle's new cache lookups. Whatever goes wrong is a miss: the calls are sent."""
        if not lookups:
            return
        try:
            assert self.look is not None, "a call carries a lookup but no cache looks"
            self.look(lookups)
        except Exception as exc:
            log.exception("sender: cache lookups failed; sending their requests")
            for lookup in lookups:
                lookup.error = exc
        for lookup in lookups:
            lookup.done = True

    def _send(self, calls: list[Call]) -> list[Call]:
        """Publish one message per worker; returns the calls that could not be published."""
        by_node: dict[str, list[Call]] = defaultdict(list)
        now = time.monotonic()
        seen: set[str] = set()
        live: list[tuple[str, Call]] = []
        lookups: dict[int, Lookup] = {}
        for call in calls:
            if call.id not in self._pending or call.node is None or call.id in seen:
                continue  # answered or abandoned meanwhile, or queued twice (re-sent)
            seen.add(call.id)
            if call.deadline <= now:
                self._fail([call], DeadlineExceeded("deadline passed before the request could be sent"))
                continue
            if call.lookup is not None:
                lookups.setdefault(id(call.lookup), call.lookup)
            live.append((call.node, call))
        self._look_up([lookup for lookup in lookups.values() if not lookup.done])
        for node, call in live:
            if call.found_in_cache:  # not sent: its thread wakes and reads the lookup
                if (known := self._take_back(call)) is not None:
                    known.end_in_cache()
            else:
                by_node[node].append(call)
        messages = [(node, part) for node, cs in by_node.items() for part in chunks(cs, self._message_bytes)]
        if not messages:
            return []
        # One round trip per cycle: every message, then the counters of /stats.
        pipe = self._redis.pipeline(transaction=False)
        for node, part in messages:
            queue = queue_name(node)
            envelope = encode_envelope(self.reply_key, [c.item(now) for c in part])
            pipe.lpush(queue, encode_task_message(queue, envelope, self._origin))
        for node, node_calls in by_node.items():
            pipe.hincrby(STATS_ROUTED_KEY, node, len(node_calls))
            spilled = sum(1 for c in node_calls if c.lease is not None and c.lease.spilled)
            if spilled:
                pipe.hincrby(STATS_SPILLED_KEY, node, spilled)
        try:
            results = pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            if not self._broker_down:
                log.warning("sender: cannot reach the broker (%s); retrying until each deadline", exc)
            self._broker_down = True
            return [c for _, part in messages for c in part]
        unsent: list[Call] = []
        for (_, part), result in zip(messages, results, strict=False):
            if isinstance(result, OutOfMemoryError):  # Redis reached maxmemory and evicts nothing: no retry
                self.refused_for_memory += len(part)
                log.warning("sender: Redis is full (maxmemory): %d requests answered 503", len(part))
                self._fail(part, Unavailable("the queue (Redis) is full; retry shortly"))
            elif isinstance(result, Exception):  # e.g. a replica that is read-only until promoted
                log.warning("sender: Redis refused a message (%s); retrying until each deadline", result)
                unsent += part
        if self._broker_down and not unsent:
            log.info("sender: the broker answers again")
            self._broker_down = False
        return unsent
