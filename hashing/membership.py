"""Who is in the ring: workers announce themselves in Redis, gateways follow.

A worker that is ready to serve writes ``ringserve:member:<id>`` with a time-to-live and
refreshes it every heartbeat; on a graceful stop it deletes it at once. A crashed worker's
key simply expires, so it leaves the ring within ``ttl_ms`` without anybody's help. Redis's
own clock decides expiry, so the hosts' clocks never need to agree.

Why not Celery's worker events: they are fire-and-forget pub/sub, so a gateway that starts
(or reconnects) late would not know who is there; one read of these keys always does.

This is the one module of ``hashing`` that talks to Redis; the connection is passed in.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from tasks.contract import MEMBERS_KEY, member_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """A live worker: its share of the ring and which run of the process this is.

    A worker restarted under the same id gets a new ``incarnation``: whatever the old process
    held is gone, and followers can tell even if the restart was quicker than the ttl.
    """

    weight: float
    incarnation: str


class Membership:
    def __init__(self, redis: Redis, ttl_ms: int) -> None:
        self._redis = redis
        self._ttl_ms = ttl_ms

    def announce(self, node_id: str, member: Member) -> None:
        """Join, or stay in, the ring for another ``ttl_ms``."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(MEMBERS_KEY, node_id)
        value = json.dumps({"weight": member.weight, "incarnation": member.incarnation})
        pipe.set(member_key(node_id), value, px=self._ttl_ms)
        pipe.execute()

    def leave(self, node_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.srem(MEMBERS_KEY, node_id)
        pipe.delete(member_key(node_id))
        pipe.execute()

    def alive(self) -> dict[str, Member]:
        """Live members; members whose announcement expired are pruned."""
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in self._redis.smembers(MEMBERS_KEY))
        if not ids:
            return {}
        values = self._redis.mget([member_key(i) for i in ids])
        members: dict[str, Member] = {}
        for node_id, raw in zip(ids, values, strict=True):
            if raw is None:
                self._redis.srem(MEMBERS_KEY, node_id)
                continue
            try:
                announced = json.loads(raw)
                members[node_id] = Member(float(announced["weight"]), str(announced["incarnation"]))
            except (ValueError, KeyError, TypeError):
                log.warning("member %s has an unreadable announcement %r; ignored", node_id, raw)
        return members


class Follower:
    """A thread that polls :class:`Membership` and calls ``on_change`` when it changes.

    ``on_unreachable`` is called once when Redis stops answering: nothing sent through it can
    be answered until it is back.

    Polling every ``interval_ms`` (default 250 ms) keeps a join visible well within 2 s and
    costs two Redis commands per poll per gateway process.
    """

    def __init__(
        self,
        membership: Membership,
        interval_ms: int,
        on_change: Callable[[dict[str, Member]], None],
        on_unreachable: Callable[[], None],
    ) -> None:
        self._membership = membership
        self._interval_s = interval_ms / 1000
        self._on_change = on_change
        self._on_unreachable = on_unreachable
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ringserve-membership", daemon=True)
        self.members: dict[str, Member] = {}
        self.healthy = True  # False while Redis cannot be read

    def start(self) -> None:
        self.poll()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        try:
            members = self._membership.alive()
        except RedisError as exc:
            if self.healthy:
                log.warning("membership: cannot read Redis (%s)", exc)
                self.healthy = False
                self._on_unreachable()
            return
        if not self.healthy:
            log.info("membership: Redis answers again")
        self.healthy = True
        if members != self.members:
            log.info("membership: %s", ", ".join(f"{n}×{m.weight:g}" for n, m in members.items()) or "empty")
            self.members = members
            self._on_change(dict(members))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.poll()
