"""The response cache: deterministic models' answers kept in Redis, shared by every gateway process.

An entry is keyed by :func:`digest` of the model, the version and the input tensors (names,
datatypes, shapes, bytes), as Triton keys its cache. It holds the whole result, every output, so
the outputs a request asks for (v2 ``outputs``, ``binary_data``) are picked by the route and are
not part of the key. Only results are stored, never errors.

One key per entry carries both states of a computation: while a request computes it, the key
holds that request's lock (``lock:<token>``, expiring after :data:`LEASE_MS` unless its process
renews it); then the answer replaces the lock. So a lookup that finds nothing takes the lock in the
same round trip (one Lua script), and identical requests arriving meanwhile, in any gateway
process, wait for that one computation instead of repeating it (single flight): in this process
on the leader's own flight, elsewhere on a stream the leader's end is announced on. A waiting
request looks again when the leader ends, when a lease has passed (a leader whose process died
stops renewing) or never after its own deadline; finding no lock, it computes itself.

Lookups travel with the requests they precede: the request thread hands its request to the
sender (:mod:`app.submit`) with the lookup attached, and the sender makes every lookup of its cycle
in one script call before it sends their requests. An entry found ends the request there; a lock
taken sends it on. So a miss costs no hand-over of its own: a lookup round trip on each request
thread cost the gateway about 0.11 ms of CPU per request, and a reader thread to batch them as much
again in hand-overs (docs/benchmarks.md, "cache"). What happens after the answer (storing it,
giving up a failed leader's lock, renewing held locks, counting) is written by one thread per
process, many entries per round trip, off the request path.

Bounds (Redis runs ``noeviction``, so nothing else evicts): every entry expires after the TTL, and
the entries' bytes (value, key and :data:`ENTRY_OVERHEAD_BYTES` of Redis bookkeeping each) are
counted in :data:`~tasks.contract.CACHE_BYTES_KEY`; each store drops the oldest entries
(:data:`~tasks.contract.CACHE_INDEX_KEY`, by time stored) until the sum is within the budget
again. The scripts name entry keys they build from the index, so the cache needs a single Redis
(or Sentinel), not Redis Cluster.

A Redis error in the cache is a miss: the request is computed as if there were no cache, and
this process skips the cache for :data:`RETRY_S`; what it reads is validated
(:func:`tasks.contract.decode_cached`), and garbage is a miss whose answer replaces it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from app.errors import DeadlineExceeded
from app.submit import Lookup
from tasks.contract import (
    CACHE_BYTES_KEY,
    CACHE_ENTRY_PREFIX,
    CACHE_INDEX_KEY,
    CACHE_LOCK_PREFIX,
    CACHE_SIZES_KEY,
    MAX_NAME_CHARS,
    STATS_CACHE_KEY,
    ContractError,
    Result,
    Tensor,
    cache_done_key,
    cache_entry_key,
    cache_waiting_key,
    decode_cached,
    decode_counts,
    encode_cached,
)

log = logging.getLogger(__name__)

LEASE_MS = 1_000  # a computation's lock lives this long unless renewed: how soon others take over from a dead leader
RENEW_S = LEASE_MS / 1000 / 3  # how often held locks are renewed
LOOKUP_TIMEOUT_S = 0.5  # the sender waits this long for a cycle's lookups at most (then: misses, and RETRY_S)
RETRY_S = 1.0  # after a Redis error, this process leaves the cache alone this long (no timeout per request)
ENTRY_OVERHEAD_BYTES = 512  # Redis's bookkeeping per entry: key, expiry, index and size entries (measured)
PURGE_PER_STORE = 64  # expired entries a store removes from the index at most
EVICT_PER_STORE = 1_000  # entries a store evicts at most, so that no script holds Redis for long
FLUSH_S = 0.01  # the writer waits this long after a job for others: one round trip stores many answers
WAITED = "no result within the request's deadline (an identical request was being computed)"

# Every lookup of a sender cycle in one call. KEYS[1] the counters, then each entry; ARGV[1] the lease, ARGV[2] the
# lock prefix, then per entry: the lock to take, the counter a found answer adds to. Returns, per entry, what it
# held (an answer or another's lock), or 0: the lock is ours now. The counters get one HINCRBY per name.
LOOKUP = """
local lease, prefix, found, counts = ARGV[1], ARGV[2], {}, {}
for i = 2, #KEYS do
  local entry = redis.call('GET', KEYS[i])
  local counter = 'misses'
  if entry then
    counter = string.sub(entry, 1, #prefix) ~= prefix and ARGV[2 * i] or nil
    found[i - 1] = entry
  else
    redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PX', lease)
    found[i - 1] = 0
  end
  if counter then counts[counter] = (counts[counter] or 0) + 1 end
end
for counter, n in pairs(counts) do redis.call('HINCRBY', KEYS[1], counter, n) end
return found
"""

# KEYS: index, sizes, bytes, then per entry: its key, its waiting flag, its done stream.
# ARGV: ttl ms, budget, lease ms, entry prefix, overhead, purge limit, evict limit, then per entry: digest, answer.
STORE = """
local index, sizes, bytes_key = KEYS[1], KEYS[2], KEYS[3]
local ttl, budget, lease, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local overhead, purge, evict = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]  -- microseconds: entries are ordered by when they were stored
local total = tonumber(redis.call('GET', bytes_key)) or 0
local function forget(digest)
  total = total - (tonumber(redis.call('HGET', sizes, digest)) or 0)
  redis.call('HDEL', sizes, digest)
  redis.call('ZREM', index, digest)
end
for _, digest in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl * 1000, 'LIMIT', 0, purge)) do
  forget(digest)  -- expired: its entry is gone already
end
for i = 0, (#KEYS - 3) / 3 - 1 do
  local key, waiting, done = KEYS[4 + 3 * i], KEYS[5 + 3 * i], KEYS[6 + 3 * i]
  local digest, answer = ARGV[8 + 2 * i], ARGV[9 + 2 * i]
  local size = #answer + #key + overhead
  total = total + size - (tonumber(redis.call('HGET', sizes, digest)) or 0)
  redis.call('SET', key, answer, 'PX', ttl)
  redis.call('ZADD', index, now + i, digest)  -- + i: one store's entries keep their order too
  redis.call('HSET', sizes, digest, size)
  if redis.call('EXISTS', waiting) == 1 then
    redis.call('XADD', done, '*', 'stored', '1')
    redis.call('PEXPIRE', done, lease)
  end
end
local evicted = 0
while total > budget and evicted < evict do
  local oldest = redis.call('ZRANGE', index, 0, 0)[1]
  if not oldest then total = 0 break end
  redis.call('DEL', prefix .. oldest)
  forget(oldest)
  evicted = evicted + 1
end
redis.call('SET', bytes_key, total)
return evicted
"""

# A leader that failed: KEYS entry, waiting flag, done stream; ARGV its lock, the lease.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XADD', KEYS[3], '*', 'stored', '0')
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
"""

# KEYS: entries; ARGV: the lease, then each entry's lock. Renews the locks that are still ours.
RENEW = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then redis.call('PEXPIRE', key, ARGV[1]) end
end
"""
Compute = Callable[[Lookup | None], Result | None]
"""Sends the request with the lookup (when given) made first: its result, or None if the lookup found an entry."""

SHA1 = {script: hashlib.sha1(script.encode()).hexdigest() for script in (LOOKUP, STORE, RELEASE, RENEW)}


def computed(result: Result | None) -> Result:
    """The result of a computation sent without a lookup, which always has one."""
    assert result is not None
    return result


def digest(model: str, version: str, tensors: Sequence[Tensor]) -> str:
    """BLAKE2b-256 of the model, the version and every input's name, datatype, shape and bytes.

    The header is msgpack, and each tensor's datatype and shape fix its length (validated at the edge), so
    no two requests hash the same bytes.
    """
    header = msgpack.packb([model, version, [[t.name, t.datatype, t.shape] for t in tensors]])
    h = hashlib.blake2b(header, digest_size=32)
    for t in tensors:
        h.update(t.data)
    return h.hexdigest()


@dataclass
class Flight:
    """A computation this process is leading; requests for the same digest here wait on it."""

    result: Result | None = None  # None when it ended without one
    done: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass(frozen=True)
class Store:
    digest: str
    lock: bytes
    result: Result


@dataclass(frozen=True)
class Release:
    digest: str
    lock: bytes


class Cache:
    """``through(model, version, tensors, deadline, compute)``: the cached answer, or ``compute()``'s.

    ``redis`` is the cache's own client (its socket timeout must outlast a lease); ``lookups`` the
    sender's (a short timeout: every request waits for it; by default ``redis``); ``owner`` names
    this process in its locks.
    """

    def __init__(self, redis: Redis, ttl_s: int, max_bytes: int, owner: str, lookups: Redis | None = None) -> None:
        self._redis = redis
        self._lookup_redis = lookups or redis
        self._ttl_ms = ttl_s * 1000
        self.max_bytes = max_bytes
        self._owner = owner
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self._held: dict[str, bytes] = {}  # digest -> our lock, while we compute or store it
        self._jobs: queue.SimpleQueue[Store | Release | str | None] = queue.SimpleQueue()  # str: a join
        self._skip_until = 0.0
        self.errors = 0  # Redis errors this process met (each made a miss)
        self.waiting = 0  # requests of this process waiting for another's computation now
        self._thread = threading.Thread(target=self._write, name="ringserve-cache", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._redis.close()
        self._lookup_redis.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def through(
        self, model: str, version: str, tensors: Sequence[Tensor], deadline: float, compute: Compute
    ) -> tuple[Result, bool]:
        """The answer and whether it came from the cache (stored, or computed for an identical request
        meanwhile). Raises what ``compute`` raises, or DeadlineExceeded while waiting for another's."""
        key = digest(model, version, tensors)
        while True:
            with self._lock:
                flight = self._flights.get(key)
                if flight is None:
                    flight = self._flights[key] = Flight()
                    break
            joined = self._join(flight, deadline)
            if joined is not None:
                self._jobs.put(key)
                return joined, True
            # its leader failed: this request tries again, perhaps as the leader
        result: Result | None = None
        try:
            result, cached = self._shared(key, deadline, compute)
            return result, cached
        finally:
            with self._lock:
                del self._flights[key]
            flight.result = result
            flight.done.set()

    def _join(self, flight: Flight, deadline: float) -> Result | None:
        """Wait for a computation of this process: its result, or None if it failed."""
        with self._lock:
            self.waiting += 1
        try:
            if not flight.done.wait(max(0.0, deadline - time.monotonic())):
                raise DeadlineExceeded(WAITED)
        finally:
            with self._lock:
                self.waiting -= 1
        return flight.result

    def _shared(self, key: str, deadline: float, compute: Compute) -> tuple[Result, bool]:
        """Send the request with a lookup of ``key``: the answer found, or the lock and the worker's
        answer, or wait for whoever holds the lock and look again."""
        if time.monotonic() < self._skip_until:
            return computed(compute(None)), False
        lock = CACHE_LOCK_PREFIX + f"{self._owner}:{next(self._ids)}".encode()
        lookup = Lookup(key, lock, "hits")
        while True:
            result = self._lead(key, lock, compute, lookup)
            if result is not None:
                return result, False
            found = lookup.found
            assert found is not None  # no result: the lookup found an entry
            if not found.startswith(CACHE_LOCK_PREFIX):
                try:
                    return decode_cached(found, key), True
                except ContractError as exc:
                    log.warning("cache: entry %s does not decode (%s); computing it again", key[:16], exc)
                    if not self._replace(key, lock):
                        return computed(compute(None)), False
                    return computed(self._lead(key, lock, compute, None)), False
            token = found[len(CACHE_LOCK_PREFIX) :].decode(errors="replace")
            if len(token) > MAX_NAME_CHARS:
                return computed(compute(None)), False  # not a lock of ours: garbage that expires by itself
            try:
                self._follow(key, token, found, deadline)
            except RedisError as exc:
                self._failed(exc)
                return computed(compute(None)), False
            lookup = Lookup(key, lock, "coalesced")

    def _lead(self, key: str, lock: bytes, compute: Compute, lookup: Lookup | None) -> Result | None:
        """``compute(lookup)`` holding ``lock`` (taken by the lookup on the way, or already ours without
        one) and store its result; None if the lookup found an entry instead. A lookup that failed is
        a miss whose result is not stored."""
        with self._lock:
            self._held[key] = lock  # renewed from now on: a lookup takes it just before the request leaves
        try:
            result = compute(lookup)
        except BaseException:
            self._jobs.put(Release(key, lock))
            raise
        if lookup is not None and (lookup.found is not None or lookup.error is not None):
            with self._lock:
                if self._held.get(key) == lock:
                    del self._held[key]
            if lookup.error is not None:
                self._failed(lookup.error)
            return result
        self._jobs.put(Store(key, lock, computed(result)))
        return result

    def _follow(self, key: str, token: str, lock: bytes, deadline: float) -> None:
        """Wait until the computation holding ``lock`` ends, a lease passes or ``deadline`` does."""
        with self._lock:
            self.waiting += 1
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(cache_waiting_key(token), 1, px=2 * LEASE_MS)
            pipe.get(cache_entry_key(key))
            if pipe.execute()[1] != lock:
                return  # it ended meanwhile
            wait_ms = int(min(deadline - time.monotonic(), LEASE_MS / 1000) * 1000)
            if wait_ms <= 0:
                raise DeadlineExceeded(WAITED)
            self._redis.xread({cache_done_key(token): "0-0"}, count=1, block=wait_ms)
        finally:
            with self._lock:
                self.waiting -= 1

    def look(self, lookups: list[Lookup]) -> None:
        """LOOKUP every entry of ``lookups`` in one script call (the sender's, for the requests of its
        cycle); a Redis that lost its scripts (a restart) is given them again once. Sets each lookup's
        ``found`` or ``error``."""
        keys = [STATS_CACHE_KEY, *(cache_entry_key(lookup.digest) for lookup in lookups)]
        args: list[Any] = [LEASE_MS, CACHE_LOCK_PREFIX]
        for lookup in lookups:
            args += [lookup.lock, lookup.hit]
        try:
            (found,) = self._run_scripts(
                lambda pipe: pipe.evalsha(SHA1[LOOKUP], len(keys), *keys, *args), [LOOKUP], self._lookup_redis
            )
            if isinstance(found, Exception):
                raise found
            if not isinstance(found, list) or len(found) != len(lookups):
                raise RedisError(f"the lookup script answered {type(found).__name__}, not {len(lookups)} entries")
        except RedisError as exc:
            for lookup in lookups:
                lookup.error = exc
            return
        for lookup, entry in zip(lookups, found, strict=True):
            lookup.found = entry if isinstance(entry, bytes) else None

    def _run_scripts(
        self, fill: Callable[[Pipeline], None], scripts: Sequence[str], redis: Redis | None = None
    ) -> list[Any]:
        """One round trip on ``redis`` (the cache's client by default): the pipeline ``fill`` builds, its
        errors returned in place; once more after loading ``scripts`` if Redis lost them (a restart).
        Raises RedisError when Redis fails."""
        client = redis or self._redis
        results: list[Any] = []
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            fill(pipe)
            results = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                for script in scripts:
                    client.script_load(script)
                continue
            break
        return results

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            first = time.monotonic() >= self._skip_until
            self._skip_until = time.monotonic() + RETRY_S
        if first:
            log.warning("cache: Redis failed (%s); answering without the cache for %g s", exc, RETRY_S)

    def _replace(self, key: str, lock: bytes) -> bool:
        """Take the lock over garbage (counted as the miss it is, not the hit the lookup counted)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(cache_entry_key(key), lock, px=LEASE_MS)
            pipe.hincrby(STATS_CACHE_KEY, "hits", -1)
            pipe.hincrby(STATS_CACHE_KEY, "misses", 1)
            pipe.execute()
            return True
        except RedisError as exc:
            self._failed(exc)
            return False

    # -- the writer thread ---------------------------------------------------------------------

    def _write(self) -> None:
        renewed = time.monotonic()
        while True:
            jobs = self._take(max(0.0, renewed + RENEW_S - time.monotonic()))
            if jobs is None:
                return
            due = time.monotonic() - renewed >= RENEW_S
            try:
                self._flush(jobs, renew=due)
            except Exception:  # the writer must survive anything; what it held expires
                log.exception("cache: writer error")
            if due:
                renewed = time.monotonic()

    def _take(self, timeout_s: float | None) -> list[Store | Release | str] | None:
        """Every job queued :data:`FLUSH_S` after the first, waiting up to ``timeout_s`` for it; None: stop."""
        jobs: list[Store | Release | str] = []
        try:
            job = self._jobs.get(timeout=timeout_s)
        except queue.Empty:
            return jobs
        if job is not None:
            time.sleep(FLUSH_S)
        while job is not None:
            jobs.append(job)
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return jobs
        return None

    def _flush(self, jobs: list[Store | Release | str], renew: bool) -> None:
        """One round trip: the answers to store, the failed leaders' locks, renewals, joins to count."""
        stores = [j for j in jobs if isinstance(j, Store)]
        releases = [j for j in jobs if isinstance(j, Release)]
        joins = sum(1 for j in jobs if isinstance(j, str))
        with self._lock:
            ended: list[Store | Release] = [*stores, *releases]
            for job in ended:
                if self._held.get(job.digest) == job.lock:
                    del self._held[job.digest]
            held = dict(self._held) if renew else {}
        scripts: list[tuple[str, list[Any]]] = []  # (script, keys + args) each
        if stores:
            keys = [CACHE_INDEX_KEY, CACHE_SIZES_KEY, CACHE_BYTES_KEY]
            args: list[Any] = [self._ttl_ms, self.max_bytes, LEASE_MS, CACHE_ENTRY_PREFIX]
            args += [ENTRY_OVERHEAD_BYTES, PURGE_PER_STORE, EVICT_PER_STORE]
            for job in stores:
                token = job.lock[len(CACHE_LOCK_PREFIX) :].decode()
                keys += [cache_entry_key(job.digest), cache_waiting_key(token), cache_done_key(token)]
                args += [job.digest, encode_cached(job.result)]
            scripts.append((STORE, [len(keys), *keys, *args]))
        for job in releases:
            token = job.lock[len(CACHE_LOCK_PREFIX) :].decode()
            keys = [cache_entry_key(job.digest), cache_waiting_key(token), cache_done_key(token)]
            scripts.append((RELEASE, [len(keys), *keys, job.lock, LEASE_MS]))
        if held:
            scripts.append((RENEW, [len(held), *map(cache_entry_key, held), LEASE_MS, *held.values()]))
        if not scripts and not joins:
            return

        def fill(pipe: Pipeline) -> None:
            for script, keys_and_args in scripts:
                pipe.evalsha(SHA1[script], *keys_and_args)
            if joins:
                pipe.hincrby(STATS_CACHE_KEY, "coalesced", joins)

        try:
            results = self._run_scripts(fill, [script for script, _ in scripts])
        except RedisError as exc:
            self._failed(exc)
            return
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            self._failed(RedisError(errors[0]))

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Hits, joins and misses over every gateway; bytes and entries held; this process's errors."""
        figures: dict[str, Any] = {
            "max_bytes": self.max_bytes,
            "ttl_s": self._ttl_ms // 1000,
            "errors_this_process": self.errors,
            "waiting_this_process": self.waiting,
        }
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(STATS_CACHE_KEY)
            pipe.get(CACHE_BYTES_KEY)
            pipe.zcard(CACHE_INDEX_KEY)
            counts, held, entries = pipe.execute()
        except RedisError as exc:
            return figures | {"unavailable": str(exc)}
        counted = decode_counts(counts)
        held_bytes = int(held) if held is not None and held.isdigit() else 0
        shared = {name: counted.get(name, 0) for name in ("hits", "coalesced", "misses")}
        return figures | shared | {"bytes": held_bytes, "entries": int(entries)}
