"""Flower shows the work: real workers send Celery task events for the batches their batch consumer
runs, a real event receiver (Flower's) reads them, and the Flower of ./docker-free-run.sh lists the
tasks with their runtimes per worker."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from bench.system import RingServe
from tasks.celery_app import make_celery
from tasks.contract import TASK_NAME, Item, Tensor, encode_envelope, encode_task_message, queue_name, reply_key
from tasks.settings import Settings
from tests.conftest import Cluster, wait_until

ROW = [1.0] * 64


@contextmanager
def captured(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """Every event published on ``settings``' Redis while inside, as Flower's receiver gets them."""
    app = make_celery(settings)
    events: list[dict[str, Any]] = []
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False})
        thread.start()
        try:
            yield events
        finally:
            receiver.should_stop = True
            thread.join(10)


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in list(events) if e["type"] == kind]


def test_each_batch_is_a_task_received_started_and_succeeded(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    with captured(cluster.settings) as events:
        cluster.start("worker_a")
        wait_until(lambda: bool(of_type(events, "worker-heartbeat") or of_type(events, "worker-online")), 10, "events")
        client = app_factory(cluster.settings).test_client()
        for i in range(5):  # one after the other: a batch each
            assert client.post("/infer", json={"model": "digits", "key": f"k{i}", "input": ROW}).status_code == 200
        wait_until(lambda: len(of_type(events, "task-succeeded")) == 5, 10, "5 tasks to succeed")
        time.sleep(0.5)

    received, started, succeeded = (of_type(events, f"task-{k}") for k in ("received", "started", "succeeded"))
    assert len(received) == len(started) == 5 and not of_type(events, "task-failed")
    assert {e["uuid"] for e in received} == {e["uuid"] for e in started} == {e["uuid"] for e in succeeded}
    for e in received:
        assert e["name"] == TASK_NAME and e["args"] == "1 requests, 1 rows of digits/1"
        assert e["hostname"].startswith("worker_a@")
    assert all(0 < e["runtime"] < 5 for e in succeeded)
    assert all(e["hostname"].startswith("worker_a@") and e["pid"] > 0 for e in succeeded)


def test_a_batch_whose_request_expired_is_a_failed_task(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory()
    cluster.start("worker_a")
    pixels = Tensor("pixels", "FP32", (1, 64), bytes(256))
    envelope = encode_envelope(reply_key("test"), [Item("late-1", "digits", "1", 0.0, (pixels,))])  # no time left
    queue = queue_name("worker_a")
    message = encode_task_message(queue, envelope, "gen1@test")
    with captured(cluster.settings) as events:
        wait_until(lambda: bool(of_type(events, "worker-heartbeat")), 10, "the worker's heartbeat event")
        cluster.redis.lpush(queue, message)
        wait_until(lambda: bool(of_type(events, "task-failed")), 10, "the task to fail")
    (failed,) = of_type(events, "task-failed")
    assert failed["exception"] == "RequestsFailed('expired x1')"
    (received,) = of_type(events, "task-received")
    assert received["uuid"] == failed["uuid"] and received["args"] == "1 requests, 0 rows of digits/1"


def test_no_task_events_when_they_are_off(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RINGSERVE_TASK_EVENTS", "off")  # the worker takes it from the environment
    cluster = cluster_factory()
    with captured(cluster.settings) as events:
        cluster.start("worker_a")
        make_celery(cluster.settings).control.enable_events()  # as Flower asks every few seconds
        client = app_factory(cluster.settings).test_client()
        for i in range(5):
            assert client.post("/infer", json={"model": "digits", "key": f"k{i}", "input": ROW}).status_code == 200
        wait_until(lambda: len(of_type(events, "worker-heartbeat")) >= 2, 10, "two heartbeats after the requests")
    assert not [e for e in events if e["type"].startswith("task-")]


def test_flower_lists_the_tasks_with_their_runtime_per_worker(tmp_path: Path) -> None:
    """The run script's Flower, as its user sees it (its API, with its login)."""
    with RingServe(tmp_path / "run", workers=2) as system:
        password = (system.run_dir / "secrets" / "flower.password").read_text().strip()
        headers = {"Authorization": "Basic " + base64.b64encode(f"ringserve:{password}".encode()).decode()}
        flower = f"http://127.0.0.1:{system.env['RINGSERVE_FLOWER_PORT']}/api/tasks"
        for i in range(20):
            request = urllib.request.Request(
                f"{system.url}/infer", data=json.dumps({"model": "digits", "key": f"k{i}", "input": ROW}).encode()
            )
            urllib.request.urlopen(request, timeout=10).close()

        def tasks() -> dict[str, Any]:
            with urllib.request.urlopen(urllib.request.Request(flower, headers=headers), timeout=10) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]

        # one at a time: a batch, so a task, each
        wait_until(lambda: sum(t["state"] == "SUCCESS" for t in tasks().values()) >= 20, 15, "Flower to list 20 tasks")
        listed = [t for t in tasks().values() if t["state"] == "SUCCESS"]
        assert all(t["name"] == TASK_NAME and t["runtime"] > 0 and t["received"] <= t["started"] for t in listed)
        workers = {t["worker"].split("@")[0] for t in listed}
        print(f"Flower lists {len(listed)} tasks, run by {sorted(workers)}")
        assert workers <= {"worker_1", "worker_2"} and workers
