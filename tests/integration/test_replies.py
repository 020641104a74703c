"""The reply thread takes every blob waiting in one pop, on Redis 7 (``BLMPOP``) and before it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from redis import Redis

from app.replies import ReplyListener
from tasks.contract import Reply, Result, Tensor, encode_replies, reply_key
from tests.conftest import RedisServer, wait_until

pytestmark = pytest.mark.integration

BLOBS = 40


@pytest.mark.parametrize(
    ("config", "pops"),
    [((), {"blmpop"}), (("--rename-command", "BLMPOP", ""), {"blpop", "lpop"})],
    ids=["redis-7", "without-blmpop"],
)
def test_every_waiting_reply_is_taken_in_few_pops(tmp_path: Path, config: tuple[str, ...], pops: set[str]) -> None:
    """40 blobs of 2 replies waiting: all 80 resolved in a handful of pops, with BLMPOP where the server has it
    and with BLPOP then LPOP where it does not (one refusal, then the fallback)."""
    server = RedisServer(tmp_path, extra_args=config)
    server.start()
    redis = Redis.from_url(server.url())
    key = reply_key("replies-test")
    out = Tensor("y", "FP32", (1, 1), b"\0" * 4)
    blobs = [encode_replies([Result(f"r{i}-{j}", "n", 2, "1", (out,)) for j in (0, 1)]) for i in range(BLOBS)]
    redis.rpush(key, *blobs)
    redis.config_resetstat()
    resolved: list[Reply] = []
    lock = threading.Lock()

    def on_reply(reply: Reply) -> None:
        with lock:
            resolved.append(reply)

    listener = ReplyListener(redis, key, on_reply)
    listener.start()
    try:
        wait_until(lambda: len(resolved) == 2 * BLOBS, 10, "every reply to be resolved")
        stats = redis.info("commandstats")
    finally:
        listener.stop()
        redis.close()
        server.stop()
    calls = {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("blmpop", "blpop", "lpop")}
    print(calls)
    assert {name for name, n in calls.items() if n} == pops
    assert sum(calls.values()) <= 8  # 40 blobs, up to 32 a pop
    assert sorted(r.id for r in resolved) == sorted(f"r{i}-{j}" for i in range(BLOBS) for j in (0, 1))
