"""/metrics with real parts: Redis, Celery workers, the Flask app in-process, and a whole system of
./docker-free-run.sh whose granian runs two gateway processes, one of them SIGKILLed."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from app.metrics import EXTENSION, FLUSH_LUA, FLUSH_S
from bench.system import RingServe
from tasks.contract import METRICS_GATEWAYS_KEY, METRICS_KEY, STATS_ROUTED_KEY, metrics_gauges_key
from tasks.settings import Settings
from tests.conftest import Cluster, RedisServer, kill_a_gateway_process, make_settings, wait_until

ROW = [1.0] * 64
DIGITS = (("model", "digits"), ("version", "1"))


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (sample name, sorted labels); it must parse."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(app: Flask) -> str:
    app.extensions[EXTENSION].flush()
    response = app.test_client().get("/metrics")
    assert response.status_code == 200, response.data
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return response.get_data(as_text=True)


def test_every_request_and_batch_is_counted_under_tritons_names(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory(max_delay_ms=20, batch_idle_ms=5.0)
    cluster.start("worker_a", "worker_b")
    app = app_factory(cluster.settings)
    sizes: list[int] = []

    def client(n: int) -> None:
        c = app.test_client()
        for i in range(10):
            body = {"model": "digits", "key": f"user-{n}-{i}", "input": ROW}
            r = c.post("/infer", json=body)
            assert r.status_code == 200, r.json
            sizes.append(r.json["batch_size"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = app.test_client()
    # refused before a version was chosen (none named, the split had not picked one): version ""
    assert c.post("/v2/models/digits/infer", json={"inputs": [{"name": "pixels"}]}).status_code == 400
    assert c.post("/infer", json={"model": "digits", "input": ROW, "timeout_ms": 0.001}).status_code == 504
    assert c.post("/infer", json={"model": "nope", "input": ROW}).status_code == 404  # no model: not counted

    text = scrape(app)
    v = values(text)
    assert "# TYPE nv_inference_request_success counter\n" in text
    assert 'nv_inference_request_success{model="digits",version="1"} 80\n' in text
    failed = {labels: n for (name, labels), n in v.items() if name == "nv_inference_request_failure_total" and n}
    assert failed == {
        (("model", "digits"), ("reason", "OTHER"), ("version", "")): 1,
        (("model", "digits"), ("reason", "REJECTED"), ("version", "1")): 1,
    }
    count = v[("nv_inference_count_total", DIGITS)]
    executions = v[("nv_inference_exec_count_total", DIGITS)]
    # the mean batch the clients saw (harmonic: a batch of b is reported by each of its b requests)
    seen = len(sizes) / sum(1 / b for b in sizes)
    print(f"batch size from metrics {count / executions:.4f}, from the answers {seen:.4f}")
    assert count == 80 and count / executions == pytest.approx(seen, rel=1e-9)
    assert v[("nv_inference_request_duration_us_total", DIGITS)] > 0
    assert v[("nv_inference_compute_infer_duration_us_total", DIGITS)] > 0
    assert v[("ringserve_request_duration_seconds_count", DIGITS)] == 80
    assert v[("ringserve_queue_wait_seconds_count", DIGITS)] == 80
    assert v[("ringserve_batch_compute_seconds_count", DIGITS)] == executions
    assert v[("nv_inference_pending_request_count", DIGITS)] == 0
    assert v[("ringserve_ring_members", ())] == 2
    assert sum(n for (name, _), n in v.items() if name == "ringserve_requests_routed_total") >= 80
    assert v[("ringserve_metrics_unreadable", ())] == 0


def test_a_flush_retried_after_a_lost_reply_adds_once(redis_server: RedisServer) -> None:
    redis = Redis.from_url(make_settings(redis_server).redis_url)
    add = redis.register_script(FLUSH_LUA)
    field = '["nv_inference_request_success","digits","1"]'
    for number in (1, 1, 2):  # flush 1 sent twice (its reply lost), then flush 2
        add(keys=["flushed", METRICS_KEY], args=[number, 60_000, field, 5])
    assert int(redis.hget(METRICS_KEY, field)) == 10  # type: ignore[arg-type]
    redis.flushdb()
    redis.close()


def test_garbage_in_redis_is_left_out_and_counted(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    cluster = cluster_factory()
    cluster.start("worker_a")
    app = app_factory(cluster.settings)
    assert app.test_client().post("/infer", json={"model": "digits", "input": ROW}).status_code == 200
    redis = cluster.redis
    redis.hset(METRICS_KEY, mapping={"not json": 1, '["nv_inference_count","digits"]': 1, '["no_such","a","b"]': 2})
    redis.hset(METRICS_KEY, '["nv_inference_count","digits","1"]', "NaN")
    redis.hset(STATS_ROUTED_KEY, "worker_x", "many")
    redis.sadd(METRICS_GATEWAYS_KEY, "intruder", b"\xff\xfe")
    redis.hset(metrics_gauges_key("intruder"), mapping={"[1,2]": 3, '["ringserve_breaker_open","worker_a"]': 1})
    text = scrape(app)
    v = values(text)
    assert v[("ringserve_metrics_unreadable", ())] == 6
    assert v[("nv_inference_request_success_total", DIGITS)] == 1
    assert v[("nv_inference_count_total", DIGITS)] == 0  # its one good entry was garbage
    assert v[("ringserve_breaker_open", (("node", "worker_a"),))] == 1  # what decodes still counts
    assert not redis.sismember(METRICS_GATEWAYS_KEY, b"\xff\xfe")  # no report behind it: pruned


def test_metrics_off_counts_nothing_and_serves_no_metrics(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RINGSERVE_METRICS", "off")  # for the worker, which takes the environment
    cluster = cluster_factory(metrics=False)
    cluster.start("worker_a")
    app = app_factory(cluster.settings)
    client = app.test_client()
    assert client.post("/infer", json={"model": "digits", "input": ROW}).status_code == 200
    assert client.get("/metrics").status_code == 404
    assert EXTENSION not in app.extensions
    assert not cluster.redis.exists(METRICS_KEY)


# -- a whole system: two gateway processes under granian ------------------------------------------


def http_scrape(system: RingServe) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{system.url}/metrics", timeout=10) as response:
        return values(response.read().decode())


def send(system: RingServe, requests: int, clients: int = 8) -> list[int]:
    """``requests`` over HTTP from ``clients`` threads, a connection each time (so both processes serve);
    the batch size each answer reports."""
    sizes: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(n, requests, clients):
            data = json.dumps({"model": "digits", "key": f"k{i}", "input": ROW}).encode()
            request = urllib.request.Request(f"{system.url}/infer", data=data)
            with urllib.request.urlopen(request, timeout=30) as response:
                body = json.loads(response.read())
            with lock:
                sizes.append(body["batch_size"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sizes) == requests
    return sizes


def success(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return scraped.get(("nv_inference_request_success_total", DIGITS), 0.0)


def test_counts_are_exact_over_gateway_processes_and_survive_a_killed_one(tmp_path: Path) -> None:
    with RingServe(tmp_path / "run", workers=2, settings={"GATEWAY_PROCESSES": "2"}) as system:
        redis = Redis.from_url(system.redis_url)
        before = http_scrape(system)
        sizes = send(system, 400)
        wait_until(lambda: success(http_scrape(system)) - success(before) == 400, 5, "the counts of 400 requests")
        time.sleep(4 * FLUSH_S)
        after = http_scrape(system)
        assert success(after) - success(before) == 400  # exactly: not one lost, not one twice
        flushed_by = {k for k in redis.scan_iter("ringserve:metrics:flushed:*")}
        assert len(flushed_by) == 2, flushed_by  # both gateway processes served and flushed

        count = after[("nv_inference_count_total", DIGITS)] - before.get(("nv_inference_count_total", DIGITS), 0)
        executions = after[("nv_inference_exec_count_total", DIGITS)] - before.get(
            ("nv_inference_exec_count_total", DIGITS), 0
        )
        seen = len(sizes) / sum(1 / b for b in sizes)
        print(f"batch size from /metrics {count / executions:.3f}, from the answers {seen:.3f}")
        assert count == 400 and count / executions == pytest.approx(seen, rel=1e-9)

        wait_until(kill_a_gateway_process(system), 10, "granian to respawn the killed process")
        time.sleep(3)  # well past any expiry of what a dead process reported (gauges: 1 s)
        assert success(http_scrape(system)) - success(before) == 400  # nothing flushed was lost
        send(system, 100)
        wait_until(lambda: success(http_scrape(system)) - success(before) == 500, 5, "the counts of 100 more")
        redis.close()
