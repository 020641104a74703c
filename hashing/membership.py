"""Who is in the ring: workers announce themselves in Redis, gateways follow.

A worker that is ready to serve writes its announcement with a time-to-live and refreshes it
every heartbeat; on a graceful stop it deletes it at once. A crashed worker's key simply
expires, so it leaves the ring within ``ttl_ms`` without anybody's help. Redis's own clock
decides expiry, so the hosts' clocks never need to agree.

Why not Celery's worker events: they are fire-and-forget pub/sub, so a gateway that starts
(or reconnects) late would not know who is there; one read of these keys always does.

Anybody who can write to Redis can write an announcement, so what is read is validated: a
node id of the wrong form, an unreadable announcement or a weight outside
(0, :data:`MAX_WEIGHT`] is ignored with one log line, and never reaches the ring.

This is the one module of ``hashing`` that talks to Redis. The connection, the key names and
the announcement's byte format (the wire contract's) are passed in.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

MAX_WEIGHT = 100.0  # × vnodes points: a weight of 100 is 15,000 points at 150 vnodes
MAX_INCARNATION_CHARS = 256
MAX_TTL_MS = 3_600_000
SILENT_HEARTBEATS = 2  # a member whose last refresh is older than this many heartbeats is *silent*


@dataclass(frozen=True)
class Member:
    """A live worker: its share of the ring and which run of the process this is.

    A worker restarted under the same id gets a new ``incarnation``: whatever the old process
    held is gone, and followers can tell even if the restart was quicker than the ttl.
    Raises ValueError unless ``0 < weight <= MAX_WEIGHT``.
    """

    weight: float
    incarnation: str
    heartbeat_ms: int = 1000  # how often it refreshes its announcement
    ttl_ms: int = 4000  # the lifetime each refresh gives it

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and 0 < self.weight <= MAX_WEIGHT):
            raise ValueError(f"weight must be a number in (0, {MAX_WEIGHT:g}], got {self.weight!r}")
        if not self.incarnation or len(self.incarnation) > MAX_INCARNATION_CHARS:
            raise ValueError("incarnation must be a non-empty string")
        if not 0 < self.heartbeat_ms < self.ttl_ms <= MAX_TTL_MS:
            raise ValueError(f"need 0 < heartbeat_ms < ttl_ms <= {MAX_TTL_MS}, got {self.heartbeat_ms}, {self.ttl_ms}")


class Schema(Protocol):
    """How announcements are spelled in Redis (implemented by the wire contract)."""

    members_key: str

    def member_key(self, node_id: str) -> str: ...

    def valid_node_id(self, node_id: str) -> bool: ...

    def encode(self, member: Member) -> bytes: ...

    def decode(self, raw: bytes) -> Member:
        """Raises ValueError for anything that is not a valid announcement."""
        ...


class Membership:
    def __init__(self, redis: Redis, ttl_ms: int, schema: Schema) -> None:
        self._redis = redis
        self._ttl_ms = ttl_ms
        self._schema = schema
        self._reported: set[tuple[str, str]] = set()  # bad entries already logged

    def announce(self, node_id: str, member: Member) -> None:
        """Join, or stay in, the ring for another ``ttl_ms``."""
        if not self._schema.valid_node_id(node_id):
            raise ValueError(f"node id {node_id!r} is not of the form the ring accepts")
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(self._schema.members_key, node_id)
        pipe.set(self._schema.member_key(node_id), self._schema.encode(member), px=self._ttl_ms)
        pipe.execute()

    def leave(self, node_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.srem(self._schema.members_key, node_id)
        pipe.delete(self._schema.member_key(node_id))
        pipe.execute()

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    def server_id(self) -> str:
        """Redis's ``run_id``: a new one means a new server process, whose data may be gone.

        Unlike a key of our own, it cannot survive a restart or be copied to a replica that a
        Sentinel promotes, so it says "this Redis is not the one you wrote to" every time.
        """
        info: dict[str, object] = self._redis.info("server")  # type: ignore[assignment]
        return str(info.get("run_id", ""))

    def silent(self, members: dict[str, Member]) -> set[str]:
        """Members that missed :data:`SILENT_HEARTBEATS` heartbeats: dead or frozen, not yet expired.

        Read from the announcements' remaining lifetimes (``PTTL``), so no clock is compared.
        """
        ids = sorted(members)
        pipe = self._redis.pipeline(transaction=False)
        for node_id in ids:
            pipe.pttl(self._schema.member_key(node_id))
        left_ms = pipe.execute()
        silent = set()
        for node_id, left in zip(ids, left_ms, strict=True):
            member = members[node_id]
            if isinstance(left, int) and left >= 0 and member.ttl_ms - left > SILENT_HEARTBEATS * member.heartbeat_ms:
                silent.add(node_id)
        return silent

    def alive(self) -> dict[str, Member]:
        """Valid live members; ids whose announcement expired are pruned, bad ones ignored."""
        raw_ids: set[bytes] = self._redis.smembers(self._schema.members_key)  # type: ignore[assignment]
        ids = sorted(m.decode(errors="replace") for m in raw_ids)
        bad = {(i, "not an id of the form the ring accepts") for i in ids if not self._schema.valid_node_id(i)}
        good_ids = [i for i in ids if self._schema.valid_node_id(i)]
        keys = [self._schema.member_key(i) for i in good_ids]
        values: list[bytes | None] = self._redis.mget(keys) if keys else []  # type: ignore[assignment]
        members: dict[str, Member] = {}
        for node_id, raw in zip(good_ids, values, strict=True):
            if raw is None:
                self._redis.srem(self._schema.members_key, node_id)
                continue
            try:
                members[node_id] = self._schema.decode(raw)
            except ValueError as exc:
                bad.add((node_id, f"{exc}; announcement {raw[:200]!r}"))
        for node_id, why in sorted(bad - self._reported):  # each bad entry is logged once
            log.warning("membership: ignoring member %r: %s", node_id[:100], why)
        self._reported = bad
        return members


class Follower:
    """A thread that polls :class:`Membership` and calls ``on_change`` when it changes.

    It reports *silent* members (``on_silent``): announced, but their last refresh is older than
    two heartbeats, so they are dead or frozen long before their announcement expires. It also
    watches Redis itself: ``on_unreachable`` is called once when Redis stops
    answering, and ``on_recovered(data_lost)`` once when it answers again, or as soon as its
    ``run_id`` changed (a restarted or promoted server: whatever was queued there is gone).

    Polling every ``interval_ms`` (default 250 ms) keeps a join visible well within 2 s and
    costs three Redis commands per poll per gateway process.
    """

    def __init__(
        self,
        membership: Membership,
        interval_ms: int,
        on_change: Callable[[dict[str, Member]], None],
        on_unreachable: Callable[[], None],
        on_recovered: Callable[[bool], None],
        on_silent: Callable[[set[str]], None],
    ) -> None:
        self._membership = membership
        self._interval_s = interval_ms / 1000
        self._on_change = on_change
        self._on_unreachable = on_unreachable
        self._on_recovered = on_recovered
        self._on_silent = on_silent
        self.silent: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ringserve-membership", daemon=True)
        self._server_id: str | None = None
        self._grace_until = 0.0  # after a data loss: members keep their place until then
        self.members: dict[str, Member] = {}
        self.healthy = True  # False while Redis cannot be read

    @property
    def alive(self) -> bool:
        """The polling thread runs (an unexpected error would have ended it)."""
        return self._thread.is_alive()

    def start(self) -> None:
        self.poll()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        try:
            server_id = self._membership.server_id()
            members = self._membership.alive()
            silent = self._membership.silent(members)
        except RedisError as exc:
            if self.healthy:
                log.warning("membership: cannot read Redis (%s)", exc)
                self.healthy = False
                self._on_unreachable()
            return
        data_lost = self._server_id is not None and server_id != self._server_id
        recovered = not self.healthy
        self._server_id = server_id
        self.healthy = True
        if data_lost:
            # The announcements went with the data: give every member one ttl to announce
            # itself again before it counts as gone (and its requests are re-routed).
            self._grace_until = time.monotonic() + self._membership.ttl_ms / 1000
        if time.monotonic() < self._grace_until:
            members = {**{n: m for n, m in self.members.items() if n not in members}, **members}
        if data_lost or recovered:
            log.warning("membership: Redis answers again%s", " — a new server: its data is gone" if data_lost else "")
            self._on_recovered(data_lost)
        if members != self.members:
            log.info("membership: %s", ", ".join(f"{n}×{m.weight:g}" for n, m in members.items()) or "empty")
            self.members = members
            self._on_change(dict(members))
        if silent != self.silent:
            if silent - self.silent:
                log.warning("membership: %s missed their heartbeats", ", ".join(sorted(silent - self.silent)))
            self.silent = silent
            self._on_silent(set(silent))

    def _run(self) -> None:
        # While Redis is unreachable, look 5 times as often: arrivals get 503 until it is seen back.
        while not self._stop.wait(self._interval_s if self.healthy else self._interval_s / 5):
            self.poll()
