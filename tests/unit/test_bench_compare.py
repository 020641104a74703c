"""compare's sweep and its choice of each system's best setting, wrk's figures as a run summary, and the
report's floor line: pure functions, checked by hand."""

from __future__ import annotations

import math
from typing import Any

from bench import report, wrk
from bench.scenarios.compare import Config, best, median_run, plan, point
from bench.stats import LATENCY_KEYS, SUMMARY_KEYS

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:8000/infer
  Latency Distribution
     50%    1.00ms
     99%    3.00ms
  1000 requests in 1.00s, 100.00KB read
  Non-2xx or 3xx responses: 10
Requests/sec:   1000.00
bench-wrk-done: {"requests": 1000, "duration_us": 1000000, "errors": {"connect": 0, "read": 2, "write": 0, \
"status": 10, "timeout": 0}, "latency_us": {"mean": 1200.0, "std": 300.0, "max": 5000, "p50": 1000, \
"p95": 2000, "p99": 3000, "p999": 4000}, "quantiles_us": [500, 1000, 1000, 4000]}
"""


def figures(rps: float, p99: float = 10.0, gateway: float = 0.3) -> dict[str, Any]:
    per = {"gateway": gateway, "client": 0.05, "other": 0.01}
    return {
        "throughput_rps": rps,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "failed": 0,
        "server_cpu_ms_per_request": gateway,
        "cpu_ms_per_request": per,
    }


def test_plan_sweeps_workers_for_all_and_max_wait_for_mosec_and_ends_with_the_floor() -> None:
    configs = plan(["naive", "mosec"], [1, 2], {"mosec": {"max_wait_ms": [1, 20]}})
    assert [c.label for c in configs] == [
        "ringserve workers=1",
        "ringserve workers=2",
        "naive workers=1",
        "naive workers=2",
        "mosec workers=1 max_wait_ms=1",
        "mosec workers=1 max_wait_ms=20",
        "mosec workers=2 max_wait_ms=1",
        "mosec workers=2 max_wait_ms=20",
        "floor",
    ]
    assert configs[5].setting == {"workers": 1, "max_wait_ms": 20}


def test_point_takes_medians_over_rounds_and_best_picks_the_fastest_setting() -> None:
    slow = point(Config("mosec", {"workers": 1}), [figures(100), figures(300), figures(200, p99=30)])
    fast = point(Config("mosec", {"workers": 2}), [figures(400, gateway=0.2), figures(500, gateway=0.4)])
    assert (slow["throughput_rps"], slow["p99_ms"], slow["server_cpu_ms_per_request"]) == (200, 10.0, 0.3)
    assert fast["throughput_rps"] == 450 and math.isclose(fast["cpu_ms_per_request"]["gateway"], 0.3)
    floor = point(Config("floor", {}), [figures(9000)])
    top = best([slow, floor, fast])
    assert list(top) == ["mosec", "floor"] and top["mosec"]["setting"] == {"workers": 2}


def test_the_run_shown_is_the_median_round() -> None:
    runs = [{"summary": {"throughput_rps": v}, "id": i} for i, v in enumerate((300, 100, 200, 400))]
    assert median_run(runs)["id"] == 2  # 200: the lower of the two middle ones
    assert median_run(runs[:3])["id"] == 2


def test_wrk_figures_become_a_run_summary() -> None:
    result = wrk.parse(WRK_OUTPUT) | {"cpu_s": 0.1, "cpu_percent": 10.0, "cpu_us_per_request": 100.0}
    result |= {"threads": 2, "connections": 50}
    assert result["latency_ms"]["p999"] == 4.0 and result["quantiles_ms"] == [0.5, 1.0, 1.0, 4.0]
    summary = wrk.summary(result, mean_batch_size=4.0, nodes={"worker_2": 5, "worker_1": 5})
    assert tuple(summary) == SUMMARY_KEYS and tuple(summary["latency_ms"]) == LATENCY_KEYS
    assert (summary["requests"], summary["successful"], summary["failed"]) == (1002, 990, 12)
    assert summary["failed_by_status"] == {"non_2xx": 10, "no_response": 2}
    assert summary["throughput_rps"] == 990.0 and summary["balance"]["max_over_mean"] == 1.0
    assert list(summary["nodes"]) == ["worker_1", "worker_2"]
    assert sum(wrk.latency_histogram(result)["counts"]) == 1000  # four quantiles, scaled to the answers
    assert not wrk.client(result)["saturated"]


def test_lua_script_prints_the_done_line() -> None:
    from bench.loadgen import Load

    script = wrk.lua_script(Load("http://127.0.0.1:1/infer", requests=None, duration_s=1.0))
    assert script.count("wrk.format(") == wrk.PREPARED_REQUESTS
    assert f'prefix = {wrk.QUANTILES}, "{wrk.DONE_PREFIX}"' in script and "done = function" in script


def test_report_puts_each_run_beside_the_floor() -> None:
    floor = {"web": 0.1, "client": 0.02, "other": 0.01}
    run = {
        "summary": {"throughput_rps": 1.0},
        "config": {"system": "ringserve"},
        "server": {"cpu": {"cpu_ms_per_request": {"gateway": 0.3, "worker_1": 0.1, "client": 0.05}}},
    }
    assert report.floor_cpu([run, {**run, "config": {"system": "floor"}}]) == run["server"]["cpu"]["cpu_ms_per_request"]
    assert report.floor_cpu([run]) is None
    line = report.floor_line(run["server"]["cpu"]["cpu_ms_per_request"], floor)
    assert "floor's server 0.100" in line and "gateway 0.300 = floor + 0.200 (3.00x)" in line
    assert "whole server 0.400 (4.00x)" in line
