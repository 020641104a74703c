"""Deadlines without a shared clock: workers whose wall clocks are 5 minutes off serve normally.

The gateway sends each request's remaining budget (``budget_ms``) and the worker turns it into a
deadline on its own monotonic clock on receipt, so no two hosts' clocks are ever compared. Two
workers run under libfaketime (``faketime -f +5m`` and ``-5m``), one with the true time. Each
skewed worker must:

* really run on a skewed wall clock (its log's timestamps are 5 minutes off);
* answer 200 for the keys it owns, and skip none of those requests as expired;
* skip as expired exactly the requests whose budget ran out while it held them, no more, no
  less, while the gateway answers their clients 504 within ``timeout_ms`` + 50 ms, whether the
  worker is slow (it holds a batch longer than the budget) or frozen (SIGSTOP).

Were the deadline an instant on the gateway's wall clock compared with the worker's, the
``+5m`` worker would skip every request (normal ones answered 504: the 200 checks fail) and
the ``-5m`` worker would compute requests 5 minutes after their clients gave up (the expired
count stays 0: the skip checks fail).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tasks.settings import Settings
from tasks.worker import celery_argv
from tests.conftest import ROOT, Cluster, Worker, settings_env, wait_until

FAKETIME = shutil.which("faketime")
pytestmark = pytest.mark.skipif(
    FAKETIME is None, reason="needs libfaketime's faketime command (Debian: apt-get install faketime)"
)

SKEWS_S = {"w_ahead": +300.0, "w_behind": -300.0}  # node -> its wall clock minus the true time
FAKETIME_OFFSETS = {"w_ahead": "+5m", "w_behind": "-5m"}
HOLD_MS = 400  # every partial batch waits this long: longer than the budget of a short request
TIMEOUT_MS = 200  # a client's own deadline, shorter than HOLD_MS
SLACK_MS = 50  # how late the gateway may answer a client whose deadline passed
ROW = [1.0] * 64
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


class SkewedWorker(Worker):
    """A worker process started under ``faketime -f <offset>`` (libfaketime via LD_PRELOAD).

    libfaketime shifts every clock of that process, ``time.time()`` and ``time.monotonic()``
    alike; only differences of the monotonic clock within the process reach a deadline.
    ``faketime`` runs the worker as its child and waits for it, but forwards no signal: signals
    go to the child (:meth:`send_signal`), and the wrapper exits once the child has.
    """

    def __init__(self, node_id: str, settings: Settings, log_dir: Path, offset: str) -> None:
        super().__init__(node_id, settings, log_dir)
        self.offset = offset

    def start(self) -> None:
        assert FAKETIME is not None
        env = {**os.environ, **settings_env(self.settings), "OPENBLAS_NUM_THREADS": "1"}
        argv = [FAKETIME, "-f", self.offset, sys.executable, "-m", *celery_argv(self.node_id, ["--loglevel", "INFO"])]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def worker_pid(self) -> int | None:
        """The celery process: ``faketime``'s only child (None once it has exited)."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        return int(children[0]) if children else None

    def send_signal(self, sig: int) -> None:
        pid = self.worker_pid()
        assert pid is not None, f"{self.node_id} is not running"
        os.kill(pid, sig)

    def begin_stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the worker itself: ``faketime`` would not pass the signal on, and killing it would
        leave the worker running on its own."""
        pid = self.worker_pid() if self.proc is not None else None
        if pid is not None and not self.signalled:
            os.kill(pid, sig)
            self.signalled = True

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if self.proc is None:
            return
        worker = self.worker_pid()
        self.begin_stop(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pid = self.worker_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.signalled = False
        assert worker is None or not Path(f"/proc/{worker}").exists(), f"{self.node_id} outlived its faketime wrapper"


def start_skewed(cluster: Cluster, node_id: str, offset: str) -> float:
    """Start a skewed worker in ``cluster``; returns the true time at which it had announced."""
    before = cluster.membership.alive().get(node_id)
    worker = cluster.workers[node_id] = SkewedWorker(node_id, cluster.settings, cluster.log_dir, offset)
    worker.start()

    def announced() -> bool:
        member = cluster.membership.alive().get(node_id)
        return member is not None and member != before

    wait_until(announced, 60, f"{node_id} (faketime {offset}) to join the ring")
    return time.time()


def log_clock_skew_s(worker: Worker, announced_at: float) -> float:
    """How far the worker's log timestamps are from the true time, in seconds.

    The worker logs "serving" right after it announces itself; the test saw the announcement at
    ``announced_at`` (true time), within a poll interval plus scheduling delays of that line.
    """
    lines = [line for line in worker.log().splitlines() if f"node {worker.node_id}: serving" in line]
    assert lines, f"no 'serving' line in {worker.node_id}'s log:\n{worker.log()[-2000:]}"
    stamp = lines[-1].lstrip("[").split(": ", 1)[0]
    return datetime.strptime(stamp, LOG_TIME_FORMAT).timestamp() - announced_at


def python_clock_skew_s(offset: str) -> float:
    """``time.time()`` of a Python process under ``faketime -f offset``, minus the true time."""
    assert FAKETIME is not None
    out = subprocess.run(
        [FAKETIME, "-f", offset, sys.executable, "-c", "import time; print(time.time())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out) - time.time()


def post(client: FlaskClient, key: str, timeout_ms: float | None = None) -> tuple[int, float, str | None]:
    """(status, seconds taken, serving node) of one request to the simple API."""
    body: dict[str, object] = {"key": key, "input": ROW}
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    started = time.monotonic()
    response = client.post("/infer", json=body)
    took = time.monotonic() - started
    node = response.get_json().get("node") if response.status_code == 200 else None
    return response.status_code, took, node


def post_all(app: Flask, keys: list[str]) -> list[tuple[int, float, str | None]]:
    """Requests for ``keys`` sent at once (they share the workers' batches)."""
    results: list[tuple[int, float, str | None]] = [(0, 0.0, None)] * len(keys)

    def one(i: int) -> None:
        results[i] = post(app.test_client(), keys[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def expired_skipped(client: FlaskClient) -> dict[str, int]:
    """``/stats`` ``expired_skipped_per_node``, with a 0 for each worker that skipped none."""
    counts = client.get("/stats").get_json()["expired_skipped_per_node"]
    return {node: counts.get(node, 0) for node in ("w_true", *SKEWS_S)}


def test_skewed_workers_keep_deadlines(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    # A worker frozen below must keep its place (and its requests): no silence detection here.
    cluster = cluster_factory(max_delay_ms=HOLD_MS, batch_idle_ms=HOLD_MS, member_ttl_ms=30_000, heartbeat_ms=10_000)
    cluster.start("w_true")
    announced_at = {node: start_skewed(cluster, node, FAKETIME_OFFSETS[node]) for node in SKEWS_S}

    # libfaketime really moves the wall clock of those processes.
    for node, skew_s in SKEWS_S.items():
        in_python = python_clock_skew_s(FAKETIME_OFFSETS[node])
        in_log = log_clock_skew_s(cluster.workers[node], announced_at[node])
        print(f"{node}: faketime {FAKETIME_OFFSETS[node]}: python time.time() {in_python:+.1f} s, log {in_log:+.1f} s")
        assert abs(in_python - skew_s) < 5
        assert abs(in_log - skew_s) < 15

    app = app_factory(cluster.settings)
    client = app.test_client()
    wait_until(lambda: client.get("/v2/health/ready").status_code == 200, 10, "the gateway to be ready")
    wait_until(lambda: len(client.get("/stats").get_json()["members"]) == 3, 10, "the gateway to see 3 workers")

    # Normal requests: every one answered 200, by its owner; none skipped as expired.
    keys = [f"skew-{i}" for i in range(60)]
    first = post_all(app, keys)
    assert [s for s, _, _ in first] == [200] * len(keys)
    owned = {node: [k for k, (_, _, n) in zip(keys, first, strict=True) if n == node] for node in SKEWS_S}
    for node, node_keys in owned.items():
        assert len(node_keys) >= 8, f"{node} owns only {len(node_keys)} of {len(keys)} keys"
    skipped = {node: 0 for node in ("w_true", *SKEWS_S)}
    assert expired_skipped(client) == skipped

    def skips(node: str, count: int) -> None:
        """``node`` skips exactly ``count`` more requests as expired (once their batch runs)."""
        skipped[node] += count
        wait_until(lambda: expired_skipped(client) == skipped, 10, f"skips {skipped} (got {expired_skipped(client)})")

    for node, node_keys in owned.items():
        # Slow: the worker holds a lone request HOLD_MS, longer than its budget: the client hears
        # 504 at its own deadline, and the worker skips the request when the batch runs. One at
        # a time, so that no request joins a batch that is already part-way through its wait.
        slow = []
        for key in node_keys[:4]:
            status, took, _ = post(client, key, timeout_ms=TIMEOUT_MS)
            assert status == 504, f"{node} slow: {key} answered {status}"
            slow.append(took * 1000)
            skips(node, 1)
        # Frozen: the worker reads nothing until SIGCONT; then it reads the requests with the
        # budget they had when sent (the queue wait is not counted), holds and skips them.
        worker = cluster.workers[node]
        assert isinstance(worker, SkewedWorker)
        worker.send_signal(signal.SIGSTOP)
        try:
            frozen = [post(client, key, timeout_ms=TIMEOUT_MS) for key in node_keys[4:8]]
        finally:
            worker.send_signal(signal.SIGCONT)
        assert [s for s, _, _ in frozen] == [504] * 4, f"{node} frozen: {frozen}"
        skips(node, 4)
        tooks = {"slow": slow, "frozen": [took * 1000 for _, took, _ in frozen]}
        for how, ms in tooks.items():
            print(f"{node} {how}: 504 after {', '.join(f'{t:.0f}' for t in ms)} ms (timeout_ms {TIMEOUT_MS})")
            assert all(TIMEOUT_MS <= t <= TIMEOUT_MS + SLACK_MS for t in ms)

    # And afterwards the skewed workers still serve, skipping nothing whose budget is left.
    again = post_all(app, [k for node_keys in owned.values() for k in node_keys])
    assert {s for s, _, _ in again} == {200}  # a request skipped as expired would be a 504
    assert expired_skipped(client) == skipped
    print(f"expired_skipped_per_node {expired_skipped(client)} (only the {TIMEOUT_MS} ms requests); {len(again)} 200s")
