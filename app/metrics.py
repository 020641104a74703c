"""``GET /metrics``: Prometheus text under Triton's names, summed over every gateway process and worker.

granian serves from several processes, workers may run on other hosts, and any of them may
restart: prometheus_client's multiprocess mode covers one host's processes and has no callback
gauges. So every process counts in memory and adds its counts to one Redis hash that any
gateway reads (:mod:`tasks.contract`, "metrics"):

* a gateway process counts each inference request in ``after_request`` (a lock and four dict
  increments: 1.4 µs; a Redis round trip per request would cost 44 µs), and its flusher thread
  adds the counts to Redis every :data:`FLUSH_S` with a
  number that a Lua script checks, so that a flush retried after a lost reply adds once;
* a worker adds each batch's counts in the pipeline that carries the batch's replies
  (:mod:`tasks.metrics`): no round trip of its own;
* gauges only a live process knows (its requests pending, its open breakers) go into an expiring
  hash per gateway process, summed over the processes that still report.

What can be lost: a gateway process's counts of its last :data:`FLUSH_S` when it is killed or
stopped (granian's processes run no exit handlers; a normal exit flushes them), and everything
when Redis loses its data (the counters start again from zero, which Prometheus' ``rate()`` takes
as a counter reset). Nothing flushed is lost when a process dies. Every entry read from Redis is
validated; what does not decode is left out and counted (``ringserve_metrics_unreadable``).
docs/metrics.md has the names, the measurements behind these choices and what each costs.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, g, request
from redis import Redis
from redis.exceptions import RedisError

from app.errors import Unavailable
from app.exposition import CONTENT_TYPE, read_snapshot, render
from app.submit import Dispatcher
from tasks.contract import (
    METRICS_GATEWAYS_KEY,
    METRICS_KEY,
    Drops,
    latency_le,
    metrics_flushed_key,
    metrics_gauges_key,
    series_field,
)

if TYPE_CHECKING:
    from app.gateway import Gateway

log = logging.getLogger(__name__)

EXTENSION = "ringserve.metrics"
FLUSH_S = 0.25  # how often a gateway process adds its counts to Redis: what a kill may lose
GAUGES_TTL_MS = 1_000  # a process's gauges vanish this long after its last report (four flushes)
FLUSHED_TTL_MS = 24 * 3600 * 1000  # a flush's number is kept this long, to refuse the same flush retried
EXIT_FLUSH_S = 2.0  # the most an exiting process waits for its last flush
STARTED = "ringserve.started"  # the WSGI environ key of a request's time.perf_counter() on arrival

# Adds a flush's counts to METRICS_KEY unless this process's flush of that number was added already.
# KEYS: the process's last-flush key, METRICS_KEY; ARGV: number, the key's ttl (ms), field, count, ...
FLUSH_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def failure_reason(status: int) -> str:
    """Triton's ``reason`` for an inference request answered ``status``.

    REJECTED: it was not queued or not computed in time (429, 503, 504: Triton's queue rejections
    and scheduler timeouts); BACKEND: the server failed it (500: the model raised on the worker;
    502: a worker's answer did not fit); OTHER: the request itself was wrong (4xx). CANCELED stays
    0: a client that hangs up is not seen.
    """
    if status in (429, 503, 504):
        return "REJECTED"
    return "BACKEND" if status >= 500 else "OTHER"


def request_counts(model: str, version: str, status: int, seconds: float) -> tuple[tuple[str, int], ...]:
    """What one inference request adds: Triton's success or failure count; for a success, its duration."""
    if status >= 400:
        return ((series_field("nv_inference_request_failure", model, version, failure_reason(status)), 1),)
    us = round(seconds * 1e6)
    return (
        (series_field("nv_inference_request_success", model, version), 1),
        (series_field("nv_inference_request_duration_us", model, version), us),
        (series_field("ringserve_request_duration_seconds_bucket", model, version, latency_le(seconds)), 1),
        (series_field("ringserve_request_duration_seconds_sum_us", model, version), us),
    )


class Tally:
    """This process's counts since its last flush: request threads add, the flusher takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, counts: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            for field, n in counts:
                self._counts[field] += n

    def take(self) -> Counter[str]:
        with self._lock:
            taken, self._counts = self._counts, Counter()
        return taken


class Flusher:
    """One gateway process's counts and gauges into Redis, every :data:`FLUSH_S`.

    A flush carries a number; :data:`FLUSH_LUA` adds it only if that number is not the last one
    added, so a flush whose reply was lost (Redis failed over, a timeout, redis-py retrying) is
    sent again unchanged and counted once. The thread stops with the process's sender (a
    stopped gateway) or at exit, flushing a last time.
    """

    def __init__(self, redis: Redis, dispatcher: Dispatcher, tally: Tally) -> None:
        self._redis = redis
        self._dispatcher = dispatcher
        self._tally = tally
        self._flushed_key = metrics_flushed_key(dispatcher.gateway_id)
        self._gauges_key = metrics_gauges_key(dispatcher.gateway_id)
        self._add = redis.register_script(FLUSH_LUA)
        self._number = 0
        self._unapplied: tuple[int, Counter[str]] | None = None
        self._resent: Counter[str] = Counter()  # the dispatcher's re-sends counted so far
        self._refused = 0  # and its requests refused for memory
        self._reported = False  # our gauge hash exists
        self._failing = False  # the last flush failed: log once, not every FLUSH_S
        self._flushing = threading.Lock()  # the thread's flushes and a test's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ringserve-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Flush a last time and stop (at exit, or when a test stops its gateway)."""
        atexit.unregister(self.stop)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(EXIT_FLUSH_S)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S) and self._dispatcher.alive:
            self._try(self.flush)
        self._try(self.flush)
        self._try(self._withdraw)

    def _try(self, step: Callable[[], None]) -> None:
        try:
            step()
        except RedisError as exc:
            if not self._failing:
                log.warning("metrics: cannot write to Redis (%s); the counts are kept and sent again", exc)
            self._failing = True
            return
        if self._failing:
            log.info("metrics: Redis takes the counts again")
        self._failing = False

    def flush(self) -> None:
        """Add what was counted since the last flush, then report the gauges. Raises RedisError;
        a flush that failed is sent again, unchanged, before anything newer."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        if self._unapplied is None:
            counts = self._tally.take()
            resent, refused = self._dispatcher.resent(), self._dispatcher.refused_for_memory
            for cause, n in resent.items():
                counts[series_field("ringserve_requests_resent", cause)] += n - self._resent[cause]
            counts[series_field("ringserve_requests_refused_for_memory")] += refused - self._refused
            self._resent, self._refused = resent, refused
            counts = +counts  # without zeros
            if counts:
                self._number += 1
                self._unapplied = (self._number, counts)
        if self._unapplied is not None:
            number, counts = self._unapplied
            args: list[str | int] = [number, FLUSHED_TTL_MS]
            for field, n in counts.items():
                args += (field, n)
            self._add(keys=[self._flushed_key, METRICS_KEY], args=args)
            self._unapplied = None
        self._report_gauges()

    def _report_gauges(self) -> None:
        """Replace our gauge hash (it expires unless refreshed); an empty one is deleted, once."""
        gauges = {
            series_field("nv_inference_pending_request_count", model, version): n
            for (model, version), n in self._dispatcher.pending_per_model().items()
        }
        gauges.update({series_field("ringserve_breaker_open", n): 1 for n in self._dispatcher.router.open_breakers()})
        if not gauges and not self._reported:
            return
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._gauges_key)
        if gauges:
            pipe.hset(self._gauges_key, mapping=gauges)  # type: ignore[arg-type]
            pipe.pexpire(self._gauges_key, GAUGES_TTL_MS)
            pipe.sadd(METRICS_GATEWAYS_KEY, self._dispatcher.gateway_id)
        pipe.execute()
        self._reported = bool(gauges)

    def _withdraw(self) -> None:
        if self._reported:
            self._redis.delete(self._gauges_key)
            self._reported = False


class Metrics:
    """The gateway's counting for /metrics, per serving process: the counts and the flusher are
    made again in a process forked after the app was built (threads do not survive a fork)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.drops = Drops("/metrics")
        self._tally = Tally()
        self._flusher: Flusher | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def tally(self) -> Tally:
        """This process's counts, its flusher started (the gateway has started this process's threads)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._tally = Tally()
                    self._flusher = Flusher(self.gateway.redis, self.gateway.dispatcher, self._tally)
                    self._flusher.start()
                    self._pid = os.getpid()
        return self._tally

    def count_request(self, response: Response) -> Response:
        """``after_request``: count an inference request, a POST to an ``/infer`` route whose model was
        found (``g.model``). Two context lookups: each costs about 1 µs."""
        state = g._get_current_object()
        model = getattr(state, "model", None)
        if model is not None:
            environ = request.environ
            if environ["REQUEST_METHOD"] == "POST" and environ["PATH_INFO"].endswith("/infer"):
                seconds = time.perf_counter() - environ[STARTED]
                self.tally().add(request_counts(model, state.version, response.status_code, seconds))
        return response

    def flush(self) -> None:
        """Flush now (tests; the flusher does it every FLUSH_S). Raises RedisError."""
        if self._flusher is not None and self._pid == os.getpid():
            self._flusher.flush()

    def stop(self) -> None:
        if self._flusher is not None and self._pid == os.getpid():
            self._flusher.stop()


def _metrics() -> Metrics:
    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]


def count_cache_lookup(model: str, version: str, hit: bool) -> None:
    """The response cache's hook: one lookup for ``model`` ``version``, inside a request.
    Does nothing when metrics are off."""
    if EXTENSION in current_app.extensions:
        name = "nv_cache_num_hits_per_model" if hit else "nv_cache_num_misses_per_model"
        _metrics().tally().add(((series_field(name, model, version), 1),))


metrics = Blueprint("metrics", __name__)


@metrics.get("/metrics")
def scrape() -> Response:
    gw = _metrics().gateway
    members = {node: m.weight for node, m in gw.dispatcher.router.members.items()}
    try:
        snapshot = read_snapshot(gw.redis, members, _metrics().drops)
    except RedisError as exc:
        raise Unavailable(f"metrics unavailable: {exc}") from None
    served = {name: tuple(meta.versions) for name, meta in gw.models.items()}
    return Response(render(snapshot, served), content_type=CONTENT_TYPE)


def start_clock(app: Flask) -> None:
    """Start each request's clock when the WSGI server hands it over: a middleware, cheaper than a
    Flask ``before_request`` hook."""
    inner = app.wsgi_app

    def timed(environ: dict[str, Any], start_response: Any) -> Any:
        environ[STARTED] = time.perf_counter()
        return inner(environ, start_response)

    app.wsgi_app = timed  # type: ignore[method-assign]


def init_app(app: Flask, gateway: Gateway) -> None:
    """Count ``gateway``'s inference requests and serve /metrics (only when ``settings.metrics``).

    The counting hook is a method of the extension, which it would otherwise look up in
    ``current_app`` on every request."""
    counter = app.extensions[EXTENSION] = Metrics(gateway)
    app.register_blueprint(metrics)
    app.after_request(counter.count_request)
    start_clock(app)
