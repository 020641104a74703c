"""Redis stops and comes back under load: fast 503s meanwhile, full service soon after, nobody left hanging."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from tasks.settings import Settings
from tests.conftest import Cluster, RedisServer, make_settings, wait_until

ROW = [1.0] * 64
OUTAGE_S = 5.0  # as long as the issue asks for


def test_redis_restart_under_load(tmp_path: Path, app_factory: Callable[[Settings], Flask]) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    cluster = Cluster(make_settings(redis, request_timeout_ms=4000), tmp_path)
    try:
        cluster.start("w1", "w2")
        app = app_factory(cluster.settings)
        client = app.test_client()
        wait_until(lambda: client.get("/v2/health/ready").status_code == 200, 5, "the gateway to be ready")

        outcomes: list[tuple[float, float, int]] = []  # (sent at, took, status)
        stop = threading.Event()

        def load(worker: int) -> None:
            c = app.test_client()
            i = 0
            while not stop.is_set():
                sent = time.monotonic()
                status = c.post("/infer", json={"key": f"{worker}-{i}", "input": ROW}).status_code
                outcomes.append((sent, time.monotonic() - sent, status))
                i += 1
                time.sleep(0.01)

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        down_at = time.monotonic()
        redis.stop()
        time.sleep(OUTAGE_S)
        redis.start()
        up_at = time.monotonic()

        def serving() -> bool:
            return all(
                client.post("/infer", json={"key": f"after-{i}", "input": ROW}).status_code == 200 for i in range(20)
            )

        wait_until(serving, 5, "full service after Redis returned")
        recovered_s = time.monotonic() - up_at
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(10)

        assert not any(t.is_alive() for t in threads)
        statuses = {s for _, _, s in outcomes}
        assert statuses <= {200, 503, 504}, statuses
        during = [(took, s) for sent, took, s in outcomes if down_at + 0.5 < sent < up_at]
        assert during and all(s == 503 for _, s in during)
        assert max(took for took, _ in during) < 1.0  # fast, not a hang
        assert max(took for _, took, _ in outcomes) < cluster.settings.request_timeout_ms / 1000 + 1
        assert any(s == 200 for sent, _, s in outcomes if sent > up_at)
        assert recovered_s < 5
        slowest_ms = max(t for t, _ in during) * 1000
        print(
            f"outage {OUTAGE_S} s: {len(during)} requests answered 503 in at most {slowest_ms:.0f} ms;"
            f" full service {recovered_s:.2f} s after Redis returned; {len(outcomes)} answers, none lost"
        )
    finally:
        cluster.close()
        redis.stop()
