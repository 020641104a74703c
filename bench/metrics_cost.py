"""``python -m bench.metrics_cost``: what counting for /metrics and task events for Flower cost.

The figures docs/metrics.md quotes. Without options, piece by piece: CPU per request of our gateway
hook against a Flask app without it, of prometheus_client's multiprocess mode, and of a Redis round
trip per request; a flush; a worker's counts per batch, and its task events per batch published 3
and 24 to a message; a real Flower's CPU per event (its own redis-server, from
``$RINGSERVE_REDIS_SERVER`` or PATH, and Flower on free ports). ``--exact``: the medium load against
a system of ./docker-free-run.sh, /metrics scraped around it. ``--overhead N``: N wrk rounds of
metrics and events on, metrics only, and both off (``--model``, digits by default). Results as JSON
on stdout; run directories under ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, g
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from app.metrics import FLUSH_LUA, Metrics, Tally, request_counts, start_clock
from bench import auth, machine
from bench.cpu import CpuMeter, server_ms
from bench.loadgen import Load, run_load
from bench.stats import mean_batch_size
from bench.system import ROOT, RingServe, free_port
from bench.trial import WARMUP_REQUESTS, by_wrk, ringserve_target, warm_up
from tasks.celery_app import make_celery
from tasks.events import EVENTS_PER_MESSAGE, TaskEvents
from tasks.metrics import Forward, batch_counts
from tasks.settings import Settings

SETTLE_S = 4.0  # Flower has worked through what it was sent
SCRAPE_AFTER_S = 1.0  # the gateways have flushed what they counted (every 0.25 s)
FLOWER_START_S = 6.0


def cpu_us(fn: Callable[[], object], calls: int) -> float:
    """CPU µs per call of ``fn``: the best of 5 rounds (the least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, time.process_time() - start)
    return best / calls * 1e6


def flask_app(counting: bool) -> Flask:
    """A route that finds its model, as ours do; with the metrics' hook and middleware, or without."""
    app = Flask("bare")

    @app.post("/infer")
    def infer() -> str:
        g.model, g.version = "digits", "1"
        return "ok"

    if counting:
        tally = Tally()

        class Counting(Metrics):
            def tally(self) -> Tally:  # no flusher: the hook's own cost
                return tally

        app.after_request(Counting(None).count_request)  # type: ignore[arg-type]
        start_clock(app)
    return app


def one_request(app: Flask) -> Callable[[], None]:
    """One ``POST /infer`` through the whole WSGI app, as a server would call it."""
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/infer", "SERVER_NAME": "x", "SERVER_PORT": "80"}
    environ["wsgi.url_scheme"] = "http"

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        return lambda data: None

    def call() -> None:
        for _ in app({**environ, "wsgi.input": io.BytesIO()}, start_response):
            pass

    return call


def prometheus_multiprocess() -> Callable[[], None]:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
    from prometheus_client import Counter as PromCounter
    from prometheus_client import Histogram

    counter = PromCounter("requests", "r", ["model", "version"])
    histogram = Histogram("latency", "l", ["model", "version"])

    def count() -> None:
        counter.labels("digits", "1").inc()
        histogram.labels("digits", "1").observe(0.004)

    return count


def process_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publisher(url: str) -> tuple[Any, TaskEvents, Callable[[], None]]:
    """A worker's dispatcher on ``url`` (task events buffered, as in a worker), our events on it, and
    what publishes what they hold."""
    app = make_celery(Settings(redis_url=url))
    connection = app.connection_for_write()
    dispatcher = app.events.Dispatcher(connection, hostname="w@h", buffer_group=["task"], buffer_limit=10**6)
    events = TaskEvents(dispatcher.send)

    def publish() -> None:
        events.flush()
        dispatcher.flush()

    return connection, events, publish


def events_us(url: str, per_message: int, tasks: int = 3000) -> float:
    """A worker's CPU per batch for its task events, published ``per_message`` events to a message."""
    connection, events, publish = publisher(url)
    with connection:
        start = time.process_time()
        for i in range(tasks):
            events.batch("8 requests, 8 rows of digits/1", time.monotonic(), time.monotonic(), Counter())
            if (3 * (i + 1)) % per_message == 0:
                publish()
        publish()
        return (time.process_time() - start) / tasks * 1e6


def flower_us_per_event(url: str, tasks: int = 3000) -> float:
    """A real Flower's CPU per event, fed batches' events 24 to a message."""
    port = free_port()
    env = {**os.environ, "RINGSERVE_REDIS_URL": url}
    command = [str(ROOT / ".venv/bin/celery"), "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"]
    flower = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(FLOWER_START_S)
        before = process_cpu_s(flower.pid)
        events_us(url, EVENTS_PER_MESSAGE, tasks)
        time.sleep(SETTLE_S)
        return (process_cpu_s(flower.pid) - before) / (3 * tasks) * 1e6
    finally:
        flower.terminate()
        flower.wait()


def pieces() -> dict[str, Any]:
    """Each piece's CPU, on its own redis-server and Flower."""
    binary = os.environ.get("RINGSERVE_REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        sys.exit("no redis-server: set RINGSERVE_REDIS_SERVER")
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--save", ""], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    time.sleep(0.5)
    redis = Redis.from_url(url)
    try:
        figures: dict[str, Any] = {}
        tally = Tally()
        figures["hook: request_counts + Tally.add"] = cpu_us(
            lambda: tally.add(request_counts("d", "1", 200, 0.004)), 50_000
        )
        bare, counted = cpu_us(one_request(flask_app(False)), 5000), cpu_us(one_request(flask_app(True)), 5000)
        figures["hook through Flask (a bare app: without, with)"] = (bare, counted)
        figures["prometheus_client multiprocess: counter + histogram"] = cpu_us(prometheus_multiprocess(), 20_000)
        fields = [f for f, _ in request_counts("d", "1", 200, 0.004)]

        def round_trip() -> None:
            pipe = redis.pipeline(transaction=False)
            for field in fields:
                pipe.hincrby("cost", field, 1)
            pipe.execute()

        figures["a Redis round trip per request (client CPU)"] = cpu_us(round_trip, 2000)
        add = redis.register_script(FLUSH_LUA)
        args: list[Any] = [0, 60_000] + [x for i in range(40) for x in (f'["nv_inference_count","m{i}","1"]', 5)]

        def flush() -> None:
            args[0] += 1
            add(keys=["flushed", "cost"], args=args)

        figures["a flush of 40 series"] = cpu_us(flush, 500)

        def worker_counts() -> None:
            pipe = redis.pipeline(transaction=False)
            for field, n in batch_counts("d", "1", [Forward(8, 8, 0.0004)], [0.003] * 8).items():
                pipe.hincrby("cost", field, n)

        figures["worker: a batch of 8's counts into its pipeline"] = cpu_us(worker_counts, 5000)
        for per_message in (3, EVENTS_PER_MESSAGE):
            figures[f"worker: a batch's task events, {per_message} a message"] = events_us(url, per_message)
        figures["Flower: CPU per event"] = flower_us_per_event(url)
        return {k: [round(x, 1) for x in v] if isinstance(v, tuple) else round(v, 1) for k, v in figures.items()}
    finally:
        redis.close()
        server.terminate()
        server.wait()


def scrape(url: str) -> dict[str, float]:
    """/metrics, every sample summed by name."""
    with auth.get(f"{url}/metrics", timeout_s=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def exact(run_dir: Path, requests: int = 5000, concurrent: int = 50) -> dict[str, Any]:
    """The medium load through our client (which waits for every answer), /metrics scraped before and
    after: its success count against the client's, its batch size against the answers'."""
    with RingServe(run_dir, workers=3) as system:
        load = Load(url=system.url, requests=requests, concurrent=concurrent)
        warm_up(load, WARMUP_REQUESTS)
        time.sleep(SCRAPE_AFTER_S)
        before = scrape(system.url)
        meter = CpuMeter(system.pids())
        result = run_load(load, "exact", meter=meter)
        time.sleep(SCRAPE_AFTER_S)
        after = scrape(system.url)
    ok = [r for r in result.records if r.ok]
    delta = {name: value - before.get(name, 0.0) for name, value in after.items()}
    return {
        "successful": len(ok),
        "nv_inference_request_success_delta": delta["nv_inference_request_success_total"],
        "mean_batch_size_answers": mean_batch_size(r.batch_size for r in ok if r.batch_size),
        "mean_batch_size_metrics": delta["nv_inference_count_total"] / delta["nv_inference_exec_count_total"],
        "cpu_ms_per_request": meter.report(len(ok), result.cpu_s)["cpu_ms_per_request"],
    }


OVERHEAD = {"on": {}, "metrics_only": {"TASK_EVENTS": "off"}, "off": {"METRICS": "off", "TASK_EVENTS": "off"}}


def overhead(run_dir: Path, rounds: int, model: str = "digits", duration_s: float = 10) -> dict[str, Any]:
    """Metrics and events on, metrics only, both off, driven by wrk (50 connections), in rounds whose
    order alternates (on, metrics only, off; then off, metrics only, on; ...) so that a drift of a
    shared machine favours none."""
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for name in list(OVERHEAD) if r % 2 == 0 else list(OVERHEAD)[::-1]:
            with RingServe(run_dir / f"{name}-{r}", workers=3, settings=OVERHEAD[name]) as system:
                load = Load(url=system.url, requests=None, duration_s=duration_s, concurrent=50, model=model)
                doc = by_wrk("metrics_cost", name, ringserve_target(system), load, machine.describe())
            cpu = doc["server"]["cpu"]["cpu_ms_per_request"]
            runs.append(
                {"config": name, "round": r, "rps": doc["summary"]["throughput_rps"], "cpu_ms_per_request": cpu}
            )
            print(f"{name} round {r}: {runs[-1]['rps']:.0f} req/s, server {server_ms(cpu):.3f} ms CPU/request")
    medians = {
        name: {
            "rps": statistics.median(r["rps"] for r in runs if r["config"] == name),
            "server_cpu_ms_per_request": statistics.median(
                server_ms(r["cpu_ms_per_request"]) for r in runs if r["config"] == name
            ),
        }
        for name in OVERHEAD
    }
    return {"runs": runs, "medians": medians, "ratio_on_off": medians["on"]["rps"] / medians["off"]["rps"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--exact", action="store_true", help="the medium load: /metrics against the client's figures")
    parser.add_argument("--overhead", type=int, metavar="ROUNDS", help="wrk rounds: on, metrics only, off")
    parser.add_argument("--model", default="digits", help="the --overhead load's model (digits: the medium load's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "metrics_cost")
    args = parser.parse_args(argv)
    found: dict[str, Any] = {"pieces_cpu_us": pieces()} if not (args.exact or args.overhead) else {}
    if args.exact:
        found["exact"] = exact(args.out / "run" / "exact")
    if args.overhead:
        found["overhead"] = overhead(args.out / "run", args.overhead, args.model)
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
