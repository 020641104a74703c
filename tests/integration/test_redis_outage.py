"""Redis is killed under load and restarted empty: nothing accepted is lost, nothing hangs.

Requests in flight at the kill are held, sent again once the gateway sees a new Redis
(``run_id``), and answered 200 if their deadline allows; arrivals while Redis is down get a fast
503; full service returns within 3 s of Redis being back.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from tasks.settings import Settings
from tests.conftest import Cluster, RedisServer, make_settings, wait_until

ROW = [1.0] * 64
OUTAGE_S = 3.0
TIMEOUT_MS = 6000  # outlasts the outage: what was in flight at the kill must get 200
HOLD_MS = 200
DETECT_S = 0.5  # the gateway notices within one membership poll (100 ms here) plus a Redis timeout


def test_redis_killed_and_restarted_under_load(tmp_path: Path, app_factory: Callable[[Settings], Flask]) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    # Workers hold each request 200 ms (waiting for batch-mates), so some are always in flight at the kill.
    cluster = Cluster(
        make_settings(redis, request_timeout_ms=TIMEOUT_MS, max_delay_ms=HOLD_MS, batch_idle_ms=HOLD_MS), tmp_path
    )
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

        threads = [threading.Thread(target=load, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        down_at = time.monotonic()
        redis.stop(signal.SIGKILL)
        time.sleep(DETECT_S)
        for i in range(20):  # arrivals while Redis is down
            sent = time.monotonic()
            status = client.post("/infer", json={"key": f"down-{i}", "input": ROW}).status_code
            outcomes.append((sent, time.monotonic() - sent, status))
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
        redis.start()
        up_at = time.monotonic()

        def serving() -> bool:
            return all(
                client.post("/infer", json={"key": f"after-{i}", "input": ROW}).status_code == 200 for i in range(5)
            )

        wait_until(serving, 10, "full service after Redis returned")
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(TIMEOUT_MS / 1000 + 5)

        assert not any(t.is_alive() for t in threads)
        # Full service: the load's first success sent after Redis returned, and no failure after it.
        first_ok = min(sent + took for sent, took, s in outcomes if sent >= up_at and s == 200)
        last_failure = max((sent + took for sent, took, s in outcomes if sent >= up_at and s != 200), default=up_at)
        recovered_s = max(first_ok, last_failure) - up_at
        statuses = {s for _, _, s in outcomes}
        in_flight = [s for sent, took, s in outcomes if sent < down_at < sent + took]
        before_kill = {s for sent, _, s in outcomes if sent < down_at}
        refused = [(sent, took) for sent, took, s in outcomes if s == 503]
        slowest_s = max(took for _, took, _ in outcomes)
        print(
            f"Redis SIGKILLed for {OUTAGE_S} s under load: {len(in_flight)} requests in flight at the kill, "
            f"answered {sorted(set(in_flight))}; {len(refused)} arrivals answered 503 in at most "
            f"{max((t for _, t in refused), default=0) * 1000:.0f} ms; full service {recovered_s:.2f} s after "
            f"Redis returned; slowest answer {slowest_s:.2f} s; statuses {sorted(statuses)}; {len(outcomes)} answers"
        )
        assert in_flight and before_kill == {200}  # held and sent again: none lost, none refused
        assert all(down_at <= sent <= up_at + DETECT_S for sent, _ in refused)  # 503 only while down
        assert refused and max(took for _, took in refused) < 0.5  # fast, not a hang
        assert slowest_s < TIMEOUT_MS / 1000 + 0.5  # nobody waits past the deadline
        assert statuses <= {200, 503}
        assert recovered_s < 3.0
    finally:
        cluster.close()
        redis.stop()
