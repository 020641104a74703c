"""/metrics without Redis: Triton's exact names in the text format, what a request and a batch count,
what garbage the decoder refuses, and the task events the batch consumer sends for Flower."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from app.breaker import Breaker
from app.exposition import FAILURE_REASONS, Snapshot, render
from app.metrics import Tally, failure_reason, request_counts
from app.routing import Router
from app.submit import Dispatcher
from hashing.membership import Member
from tasks.contract import (
    LATENCY_LE,
    METRICS_KEY,
    TASK_NAME,
    ContractError,
    Series,
    Tensor,
    decode_series,
    latency_le,
)
from tasks.events import EVENTS_PER_MESSAGE, HOLD_S, TaskEvents
from tasks.metrics import Forward, batch_counts
from tasks.settings import Settings
from tests.unit.test_consumer_reconnect import (
    IDLE_MS,
    ROOT,
    FakeClock,
    FakeRedis,
    FakeTimer,
    Message,
    clock,  # noqa: F401 (a fixture)
    deliver,
    fake_consumer,
    strategy,
)
from tests.unit.test_consumer_reconnect import app as worker_app  # noqa: F401 (a fixture)

TRITON = {
    "nv_inference_request_success": "counter",
    "nv_inference_request_failure": "counter",
    "nv_inference_count": "counter",
    "nv_inference_exec_count": "counter",
    "nv_inference_request_duration_us": "counter",
    "nv_inference_queue_duration_us": "counter",
    "nv_inference_compute_infer_duration_us": "counter",
    "nv_inference_pending_request_count": "gauge",
    "nv_cache_num_hits_per_model": "counter",
    "nv_cache_num_misses_per_model": "counter",
}


def snapshot(counts: Counter[str], gauges: Counter[str] | None = None) -> Snapshot:
    """A snapshot whose counters are ``counts`` (hash fields, as the flushes and batches write them)."""
    decoded = dict(decode_series(f.encode(), str(n).encode()) for f, n in counts.items())
    pending = Counter(dict(decode_series(f.encode(), str(n).encode()) for f, n in (gauges or {}).items()))
    stats = {name: {} for name in ("routed", "spilled", "expired", "dropped", "errors")}
    stats["batches"] = {"1": 2, "7": 3}
    return Snapshot(decoded, pending, stats, {"worker_1": 1.0}, {"worker_1": 4}, {"worker_1": 2}, 0)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def requests(*statuses: int, seconds: float = 0.004) -> Counter[str]:
    counts: Counter[str] = Counter()
    for status in statuses:
        for field, n in request_counts("digits", "1", status, seconds):
            counts[field] += n
    return counts


def test_the_exposition_parses_and_names_triton_families_exactly() -> None:
    counts = requests(200, 200, 200, 504, 400, 500)
    counts += batch_counts("digits", "1", [Forward(rows=3, requests=3, seconds=0.0005)], [0.001, 0.002, 0.003])
    text = render(snapshot(counts), {"digits": ("1",), "heavy": ("1", "2")})
    found = families(text)

    assert {name: found[name].type for name in TRITON} == TRITON
    for name, kind in TRITON.items():  # no _total: Triton's spelling, in the text itself
        assert f"# TYPE {name} {kind}\n" in text
    assert 'nv_inference_request_success{model="digits",version="1"} 3\n' in text
    assert 'nv_inference_request_failure{model="digits",reason="REJECTED",version="1"} 1\n' in text
    assert 'nv_inference_request_failure{model="digits",reason="BACKEND",version="1"} 1\n' in text
    assert 'nv_inference_request_failure{model="digits",reason="OTHER",version="1"} 1\n' in text
    assert 'nv_inference_count{model="digits",version="1"} 3\n' in text
    assert 'nv_inference_exec_count{model="digits",version="1"} 1\n' in text
    assert 'nv_inference_request_duration_us{model="digits",version="1"} 12000\n' in text
    assert 'nv_inference_queue_duration_us{model="digits",version="1"} 6000\n' in text
    assert 'nv_inference_compute_infer_duration_us{model="digits",version="1"} 1500\n' in text  # 500 us x 3
    # every served version is there at 0, every failure reason with it
    for version in ("1", "2"):
        assert f'nv_inference_request_success{{model="heavy",version="{version}"}} 0\n' in text
        assert f'nv_cache_num_hits_per_model{{model="heavy",version="{version}"}} 0\n' in text
        assert f'nv_inference_pending_request_count{{model="heavy",version="{version}"}} 0\n' in text
        for reason in FAILURE_REASONS:
            assert f'nv_inference_request_failure{{model="heavy",reason="{reason}",version="{version}"}} 0\n' in text


def test_histograms_are_cumulative_with_their_sum_and_count() -> None:
    counts = requests(200, seconds=0.004) + requests(200, 200, seconds=0.02) + requests(200, seconds=30)
    found = families(render(snapshot(counts), {"digits": ("1",)}))
    samples = {(s.name, s.labels.get("le")): s.value for s in found["ringserve_request_duration_seconds"].samples}
    assert samples[("ringserve_request_duration_seconds_bucket", "0.0025")] == 0
    assert samples[("ringserve_request_duration_seconds_bucket", "0.005")] == 1
    assert samples[("ringserve_request_duration_seconds_bucket", "0.025")] == 3
    assert samples[("ringserve_request_duration_seconds_bucket", "10")] == 3
    assert samples[("ringserve_request_duration_seconds_bucket", "+Inf")] == 4
    assert samples[("ringserve_request_duration_seconds_count", None)] == 4
    assert samples[("ringserve_request_duration_seconds_sum", None)] == pytest.approx(30.044)
    sizes = {(s.name, s.labels.get("le")): s.value for s in found["ringserve_batch_size"].samples}
    assert sizes[("ringserve_batch_size_bucket", "4")] == 2 and sizes[("ringserve_batch_size_bucket", "8")] == 5
    assert sizes[("ringserve_batch_size_sum", None)] == 23 and sizes[("ringserve_batch_size_count", None)] == 5


def test_gauges_are_summed_over_the_reporting_processes() -> None:
    pending = Counter({'["nv_inference_pending_request_count","digits","1"]': 5, '["ringserve_breaker_open","w"]': 2})
    text = render(snapshot(Counter(), pending), {"digits": ("1",)})
    assert 'nv_inference_pending_request_count{model="digits",version="1"} 5\n' in text
    assert 'ringserve_breaker_open{node="w"} 2\n' in text
    assert 'ringserve_breaker_open{node="worker_1"} 0\n' in text  # a member whose breakers are all closed


def test_label_values_are_escaped() -> None:
    counts = Counter({'["nv_inference_count","a\\"b\\\\c\\nd","1"]': 1})
    found = families(render(snapshot(counts), {}))
    (sample,) = found["nv_inference_count"].samples
    assert sample.labels == {"model": 'a"b\\c\nd', "version": "1"}


def test_the_dashboard_asks_only_for_names_the_exposition_has() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    queries = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    asked = set(re.findall(r"\b(?:nv|ringserve)_[a-z_]+", queries))
    counts = requests(200) + batch_counts("digits", "1", [Forward(rows=1, requests=1, seconds=0.001)], [0.002])
    text = render(snapshot(counts), {"digits": ("1",)})
    written = set(re.findall(r"^(?:# TYPE )?([a-z_]+)[{ ]", text, re.MULTILINE))  # names as the text writes them
    assert asked and asked <= written, asked - written


def test_the_dispatcher_counts_its_pending_calls_and_what_it_sends_again() -> None:
    """What the flusher reads of this process: calls pending per model version, re-sends by cause."""
    router = Router(vnodes=150, load_factor=0, max_in_flight=100, breaker=Breaker(5, 5.0))
    dispatcher = Dispatcher(Redis.from_url("redis://unused"), router, queue_grace_s=0)  # never reaches Redis
    members = {n: Member(1.0, "run-1") for n in ("worker_a", "worker_b")}
    dispatcher.set_members(members)
    pixels = Tensor("pixels", "FP32", (1, 64), bytes(256))
    call = dispatcher.submit("user-1", "digits", "1", [pixels], time.monotonic() + 10, floor_rows=32)
    assert dispatcher.pending_per_model() == {("digits", "1"): 1}
    dispatcher.set_members({n: m for n, m in members.items() if n != call.node})  # its worker left
    assert dispatcher.resent() == {"worker_left": 1}
    dispatcher.redis_back(data_lost=True)
    assert dispatcher.resent() == {"worker_left": 1, "redis_lost": 1}


@pytest.mark.parametrize(
    ("status", "reason"), [(429, "REJECTED"), (503, "REJECTED"), (504, "REJECTED"), (500, "BACKEND"), (502, "BACKEND")]
)
def test_server_side_failures_have_triton_reasons(status: int, reason: str) -> None:
    assert failure_reason(status) == reason


@pytest.mark.parametrize("status", [400, 404, 413])
def test_a_clients_mistake_is_other(status: int) -> None:
    assert failure_reason(status) == "OTHER"


def test_a_success_counts_its_duration_and_bucket() -> None:
    assert dict(request_counts("m", "2", 200, 0.0031)) == {
        '["nv_inference_request_success","m","2"]': 1,
        '["nv_inference_request_duration_us","m","2"]': 3100,
        '["ringserve_request_duration_seconds_bucket","m","2","0.005"]': 1,
        '["ringserve_request_duration_seconds_sum_us","m","2"]': 3100,
    }


def test_the_tally_hands_its_counts_over_once() -> None:
    tally = Tally()
    tally.add([("a", 1), ("b", 2)])
    tally.add([("a", 1)])
    assert tally.take() == {"a": 2, "b": 2}
    assert tally.take() == {}


def test_a_latency_falls_in_the_first_bucket_that_holds_it() -> None:
    assert [latency_le(s) for s in (0, 0.0001, 0.00011, 10, 10.5)] == ["0.0001", "0.0001", "0.00025", "10", "+Inf"]
    assert LATENCY_LE[-1] == "+Inf"


def test_a_batch_counts_rows_forwards_and_each_requests_times() -> None:
    forwards = [Forward(rows=4, requests=2, seconds=0.001), Forward(rows=1, requests=1, seconds=0.0002)]
    counts = batch_counts("m", "1", forwards, [0.01, 0.02, 0.0])
    assert counts['["nv_inference_count","m","1"]'] == 5
    assert counts['["nv_inference_exec_count","m","1"]'] == 2
    assert counts['["nv_inference_compute_infer_duration_us","m","1"]'] == 2 * 1000 + 200
    assert counts['["nv_inference_queue_duration_us","m","1"]'] == 30000
    assert counts['["ringserve_queue_wait_seconds_bucket","m","1","0.01"]'] == 1
    assert counts['["ringserve_batch_compute_seconds_sum_us","m","1"]'] == 1200
    assert min(counts.values()) > 0  # nothing written for nothing


GARBAGE = [
    (b"not json", b"1"),
    (b'{"a": 1}', b"1"),
    (b"[]", b"1"),
    (b"[[1], 2]", b"1"),
    (b'["no_such_metric", "m", "1"]', b"1"),
    (b'["nv_inference_count", "m"]', b"1"),
    (b'["nv_inference_count", "m", 1]', b"1"),
    (b'["nv_inference_count", "m", "' + b"v" * 300 + b'"]', b"1"),
    (b'["ringserve_queue_wait_seconds_bucket", "m", "1", "0.3"]', b"1"),
    (b'["nv_inference_count", "m", "1"]', b"-1"),
    (b'["nv_inference_count", "m", "1"]', b"1.5"),
    (b'["nv_inference_count", "m", "1"]', b""),
    (b"\xff\xfe", b"1"),
]


@pytest.mark.parametrize(("field", "value"), GARBAGE)
def test_garbage_does_not_decode(field: bytes, value: bytes) -> None:
    with pytest.raises(ContractError):
        decode_series(field, value)


@given(st.binary(max_size=64), st.binary(max_size=8))
def test_decoding_raises_nothing_but_contract_errors(field: bytes, value: bytes) -> None:
    try:
        decode_series(field, value)
    except ContractError:
        pass


def test_a_series_decodes_as_it_was_written() -> None:
    series = Series("nv_inference_request_failure", ("m", "", "OTHER"))  # version "": none was chosen yet
    assert decode_series(series.field().encode(), b"7") == (series, 7)


# -- task events ------------------------------------------------------------------------------


class Recorder:
    """Stands in for Celery's EventDispatcher.send: keeps (type, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def send(self, type: str, **fields: Any) -> None:  # noqa: A002 (Celery's name)
        self.events.append((type, fields))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]


def test_a_batch_is_a_task_received_started_and_succeeded() -> None:
    sent = Recorder()
    events = TaskEvents(sent.send)
    now = time.monotonic()
    events.batch("3 requests, 3 rows of digits/1", now - 0.010, now - 0.002, Counter())
    assert sent.events == []  # held, to travel with others
    events.flush()
    assert sent.types() == ["task-received", "task-started", "task-succeeded"]
    (_, received), (_, started), (_, succeeded) = sent.events
    assert received["uuid"] == started["uuid"] == succeeded["uuid"]
    assert received["name"] == TASK_NAME and received["args"] == "3 requests, 3 rows of digits/1"
    assert "kwargs" not in received  # Flower would parse "{}" with ast.literal_eval at each of the task's events
    # stamped when it happened: its first request's arrival, its forward's start
    assert started["timestamp"] - received["timestamp"] == pytest.approx(0.008, abs=1e-3)
    assert succeeded["runtime"] == pytest.approx(0.002, abs=1e-3)


def test_a_batch_with_a_failed_request_is_a_failed_task() -> None:
    sent = Recorder()
    events = TaskEvents(sent.send)
    now = time.monotonic()
    events.batch("2 requests, 1 rows of digits/1", now, now, Counter({"expired": 1}))
    events.flush()
    assert sent.types() == ["task-received", "task-started", "task-failed"]
    assert sent.events[2][1]["exception"] == "RequestsFailed('expired x1')"


def test_events_are_handed_over_a_message_at_a_time() -> None:
    sent = Recorder()
    events = TaskEvents(sent.send)
    for _ in range(EVENTS_PER_MESSAGE // 3 - 1):
        events.batch("1 requests, 1 rows of digits/1", 0.0, 0.0, Counter())
    assert sent.events == []
    events.batch("1 requests, 1 rows of digits/1", 0.0, 0.0, Counter())
    assert len(sent.events) == EVENTS_PER_MESSAGE


def test_the_consumer_sends_events_and_writes_counts_with_its_replies(
    worker_app: Celery,  # noqa: F811
    clock: FakeClock,  # noqa: F811
) -> None:
    """Driven through the Strategy with a fake consumer: one task per batch through its dispatcher,
    the counts in the pipeline that carries the replies."""
    sent = Recorder()
    timer = FakeTimer(clock)
    consumer_ = fake_consumer(timer)
    consumer_.event_dispatcher = SimpleNamespace(send=sent.send)
    handler = strategy(worker_app, consumer_)
    for request_id in ("r1", "r2"):
        deliver(handler, Message(request_id))
    timer.run_until(clock.now + 2 * IDLE_MS / 1000)
    assert sent.events == []  # held
    timer.run_until(clock.now + HOLD_S)
    assert sent.types() == ["task-received", "task-started", "task-succeeded"]  # one batch of both
    assert sent.events[0][1]["args"] == "2 requests, 2 rows of digits/1"
    written: Counter[str] = Counter()
    for command, args in FakeRedis.log:
        if command == "hincrby" and args[0] == METRICS_KEY:
            written[args[1]] += args[2]
    assert written['["nv_inference_count","digits","1"]'] == 2
    assert written['["nv_inference_exec_count","digits","1"]'] == 1


def test_no_events_when_they_are_off(worker_app: Celery, clock: FakeClock) -> None:  # noqa: F811
    server = worker_app.tasks[TASK_NAME].server
    server.settings = dataclasses.replace(server.settings, task_events=False)
    sent = Recorder()
    timer = FakeTimer(clock)
    consumer_ = fake_consumer(timer)
    consumer_.event_dispatcher = SimpleNamespace(send=sent.send)
    handler = strategy(worker_app, consumer_)
    m = Message("r1")
    deliver(handler, m)
    timer.run_until(clock.now + HOLD_S + 2 * IDLE_MS / 1000)
    assert m.acked and sent.events == []


def test_settings_turn_metrics_and_events_off() -> None:
    off = Settings.from_env({"RINGSERVE_TASK_EVENTS": "off", "RINGSERVE_METRICS": "0"})
    assert not off.task_events and not off.metrics
    assert Settings().task_events and Settings().metrics
