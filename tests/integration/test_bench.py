"""Every benchmark scenario once, at a tiny size, for real: it starts its systems, measures, stops them all.

Checks artifacts and the shape of the results (summary keys exactly as specified); no figure is
asserted, since timing does not belong in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import procs, trial
from bench.results import RESULTS_FILE, runs_of
from bench.stats import BALANCE_KEYS, LATENCY_KEYS, SUMMARY_KEYS
from bench.system import RingServe, supervised_pids
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.integration

LOAD_ARTIFACTS = (
    RESULTS_FILE,
    "performance_report.txt",
    "latency_distribution.png",
    "node_distribution.png",
    "performance_comparison.png",
)
ARTIFACTS = {
    "light": LOAD_ARTIFACTS,
    "medium": LOAD_ARTIFACTS,
    "heavy": LOAD_ARTIFACTS,
    "batching": (*LOAD_ARTIFACTS, "batching_gain.png"),
    "scaling": (*LOAD_ARTIFACTS, "scaling.png"),
    "compare": LOAD_ARTIFACTS,
    "floor": LOAD_ARTIFACTS,
    "ceiling": (RESULTS_FILE, "performance_report.txt", "performance_comparison.png"),
    "ring": (RESULTS_FILE, "performance_report.txt", "ring_balance.png"),
    "client": LOAD_ARTIFACTS,
    "failover": (*LOAD_ARTIFACTS, "failover_timeline.png"),
    "hotkey": (*LOAD_ARTIFACTS, "hotkey_balance.png"),
    "join": (*LOAD_ARTIFACTS, "join_timeline.png"),
    "leave": (*LOAD_ARTIFACTS, "leave_timeline.png"),
    "redis-restart": (*LOAD_ARTIFACTS, "redis_restart_timeline.png"),
    "soak": (*LOAD_ARTIFACTS, "soak_memory.png"),
    "binary": (RESULTS_FILE, "performance_report.txt"),
    "sharding": (*LOAD_ARTIFACTS, "sharding_memory.png"),
    "cache": LOAD_ARTIFACTS,
}
RUNS = {
    "light": 1,
    "medium": 1,
    "heavy": 1,
    "batching": 2,
    "scaling": 2,
    "ceiling": 0,
    "ring": 0,
    "client": 3,
    "floor": 1,
    "failover": 1,
    "hotkey": 2,
    "join": 1,
    "leave": 1,
    "redis-restart": 1,
    "soak": 1,
    "binary": 2,  # and one more when the peer (mosec) runs here
    "sharding": 3,
    "cache": 3,
}
# Settings for the tiny systems of a scenario: a crashed worker leaves the ring after 1 s, not 5.
ENVIRONMENT = {"failover": {"RINGSERVE_MEMBER_TTL_MS": "1000"}}
# Scenarios whose failed requests are a measured outcome (a killed worker, Redis), reported rather than asserted.
MAY_FAIL = {"failover", "redis-restart", "sharding"}
# Scenarios that take longer than the others' 110 s at their tiny size (sharding: four systems, one after another).
# A tiny scenario's deadline: a safety net only (a tiny scenario takes 20-70 s on a slow 2-core machine,
# sharding 105-150 s).
SCENARIO_TIMEOUT_S = 240
TIMEOUT_S = {"sharding": 480}
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def bench(*args: str, timeout_s: float = 110, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **env} if env else None,
    )


def check_run(run: dict[str, Any], may_fail: bool = False) -> None:
    """A run of our client keeps every record; one driven by wrk has a histogram from wrk's quantiles."""
    summary = run["summary"]
    assert tuple(summary) == SUMMARY_KEYS
    assert tuple(summary["latency_ms"]) == LATENCY_KEYS
    assert tuple(summary["balance"]) == BALANCE_KEYS
    assert may_fail or summary["failed"] == 0, summary["failed_by_status"]
    assert {"machine", "config", "client"} <= set(run)
    if "wrk" in run:
        assert summary["requests"] == run["wrk"]["requests"] > 0 and run["client"]["tool"].startswith("wrk")
        assert sum(run["histogram"]["counts"]) > 0 and summary["latency_ms"]["p99"] > 0
        assert {"client", "other"} < set(run["server"]["cpu"]["cpu_ms_per_request"])  # and the server's processes
    else:
        assert summary["requests"] == len(run["records"]) > 0
        assert {"start_s", "end_s", "status", "key"} <= set(run["records"][0])


def check_observed_moves(seen: dict[str, Any]) -> None:
    """The keys a join or leave moved, from the answers: consistent counts, no figure asserted."""
    assert seen["keys_in_both"] > 0  # keys were answered in both phases: there is something to compare
    assert 0 <= seen["moved"] <= seen["keys_in_both"] and sum(seen["routes"].values()) == seen["moved"]
    assert 0 <= seen["moved_stable"] <= seen["stable_in_both"] <= seen["keys_in_both"]
    for phase in ("before", "after"):
        a = seen["affinity"][phase]
        assert 0 <= a["unstable"] <= a["repeated"] <= a["keys"] <= a["requests"] and a["keys"] > 0


def check_redis_restart(f: dict[str, Any], run: dict[str, Any]) -> None:
    """Redis killed and restarted: the counts agree with each other and with the records; no figure asserted."""
    ev = f["events_s"]
    assert ev["kill"] < ev["restart"] <= ev["redis_up"]
    assert f["requests"] == run["summary"]["requests"] and f["failed"] == run["summary"]["failed"]
    at = f["in_flight_at_kill"]
    assert at["requests"] > 0 and sum(at["outcomes"].values()) == at["requests"]
    assert at["timeout_outlasts_outage_ok"] <= at["timeout_outlasts_outage"] <= at["requests"]
    down = f["arrived_while_down"]
    assert sum(down["outcomes"].values()) == down["requests"]
    failures = f["failures"]
    assert {s: x["count"] for s, x in failures.items()} == run["summary"]["failed_by_status"]
    assert all(x["before_kill"] + x["while_down"] + x["after_up"] == x["count"] for x in failures.values())
    assert f["recovery"]["pre_kill_rps"] > 0
    series = f["series"]
    assert len(series["t"]) == len(series["throughput_rps"]) > 0
    assert all(len(v) == len(series["t"]) for v in series["errors_by_status_per_s"].values())


def check_compare(findings: dict[str, Any], runs: list[dict[str, Any]], report: str) -> None:
    """--tiny: one round of ringserve, naive and mosec at 1 worker (mosec at one max_wait_ms) and the floor;
    a peer that cannot run here is skipped, not failed."""
    systems = [r["config"]["system"] for r in runs]
    assert systems[0] == "ringserve" and systems[-1] == "floor"
    assert set(systems[1:-1]) | set(findings["skipped"]) == {"naive", "mosec"}
    c = findings["compare"]
    assert list(c["best"]) == systems and c["winner"] in set(systems) - {"floor"}
    assert [p["label"] for p in c["configs"]] == [r["label"] for r in runs]  # one setting each: each is the best
    assert c["best"]["ringserve"]["setting"] == {"workers": 1}
    assert all(len(p["rounds"]) == 1 for p in c["configs"]) and c["method"]["rounds"] == 1
    if "mosec" in c["best"]:
        assert c["best"]["mosec"]["setting"] == {"workers": 1, "max_wait_ms": 5}
    assert runs[0]["server"]["stats"]["batch_size_histogram"]  # ringserve's /stats, read around the wrk run
    assert findings["floor"]["throughput_rps"] > 0
    assert report.count("vs floor:") == len(runs) - 1 and "winner: " in report


def check_cache(f: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """--tiny: one round of off, repeats and no repeats; counts, not figures: every repeat (kept >= 1 s after its
    first) is a hit, nothing else is, /stats counted every request once, and no cached answer was wrong."""
    assert [r["label"] for r in runs] == ["off r1", "repeats r1", "no repeats r1"]
    assert [r["config"]["settings"]["CACHE"] for r in runs] == ["off", "on", "on"]
    off, repeats, fresh = (f["modes"][m]["rounds"][0] for m in ("off", "repeats", "no repeats"))
    assert off["counted"] == {"hits": 0, "coalesced": 0, "misses": 0} and off["cached_answers"] == 0
    assert repeats["counted"]["hits"] == repeats["cached_answers"] == f["distinct"] == repeats["counted"]["misses"]
    assert fresh["counted"] == {"hits": 0, "coalesced": 0, "misses": 2 * f["distinct"]}
    assert f["hit_rate"] == 0.5 and f["min_gap_s"] >= f["gap_s"] == 1.0
    assert f["mismatches"] == 0 and f["gateway_cpu_ms"]["miss"] > 0


def seen_sum(seen: dict[str, Any], *names: str) -> int:
    return sum(int(seen[n]) for n in names)


def no_process_left(out: Path) -> bool:
    """No supervisord socket is left (it goes when supervisord stops) and no process carries one of the
    run directories (every process started for a system inherits its RINGSERVE_RUN_DIR, also the gateway's forks)."""
    run_dirs = list(out.glob("run/*"))
    assert run_dirs or not (out / "run").exists()
    return not list(out.glob("run/*/supervisor.sock")) and not any(
        procs.with_environment("RINGSERVE_RUN_DIR", str(run_dir)) for run_dir in run_dirs
    )


def check_sharding(f: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Every answer equal to the unsharded model's; the memory figures, the limit, the join, the leave and the
    kill all measured (their values, timings and the OOM kills of the sharded workers are reported, not asserted)."""
    assert f["mismatches"] == 0 and all(f[k]["mismatches"] == 0 for k in ("steady", "churn"))
    assert f["steady"]["cached"] == 0  # every request reached the workers, not the response cache
    assert f["replicas2"]["kill"]["mismatches"] == 0
    assert [r["label"] for r in runs] == ["sharded", "sharded: join, leave", "replicas 2: kill"]
    assert 0 < f["baseline"]["total"] < f["unsharded"]["total"] and f["table_bytes"] == f["rows"] * 64 * 4
    for replicas in ("replicas1", "replicas2"):
        workers = f[replicas]["workers"]
        assert sorted(workers) == ["worker_1", "worker_2", "worker_3"]
        assert all(w["table_share"] > 0 and w["over_ideal"] > 0 for w in workers.values())
        assert sum(m["shard"]["held"] for m in f[replicas]["raw"].values()) == f["rows"] * int(replicas[-1])
    assert all(m["cgroup"]["limit"] == f["limit"] for m in f["replicas1"]["raw"].values())
    refused = f["over_limit"]  # an unsharded worker under the limit never holds the table
    assert refused["limit"] == f["limit"] and not refused["loaded"] and refused["cgroup"]["oom_kills"] >= 1
    join, leave = f["join"], f["leave"]
    assert join["added"] == "worker_4" and join["moved_rows"] > 0 and sum(join["loaded"].values()) > 0
    assert leave["leaver"] == "worker_2" and leave["leaver_held"] > 0
    assert {"add_worker", "joined", "join_loaded", "leave", "left", "leave_loaded"} <= set(f["events_s"])
    kill = f["replicas2"]
    assert kill["victim"] == "worker_2" and kill["back_s"] is not None and kill["restored_s"] is not None
    assert kill["caught_at_kill"] > 0 and kill["served_again_s"] is not None


def scenario_param(name: str) -> Any:
    return pytest.param(name, marks=pytest.mark.timeout(TIMEOUT_S.get(name, SCENARIO_TIMEOUT_S) + 10))


@pytest.mark.parametrize("name", [scenario_param(name) for name in ARTIFACTS])
def test_scenario_at_tiny_size(name: str, tmp_path: Path) -> None:
    if name == "sharding" and not (
        (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists() and os.access(CGROUP_V1_MEMORY, os.W_OK)
    ):
        pytest.skip("sharding limits workers' memory: it needs cgroup v1's memory controller, writable (root)")
    done = bench(
        "bench.scenario",
        name,
        "--tiny",
        "--out",
        str(tmp_path),
        env=ENVIRONMENT.get(name),
        timeout_s=TIMEOUT_S.get(name, SCENARIO_TIMEOUT_S),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for artifact in ARTIFACTS[name]:
        assert (tmp_path / artifact).stat().st_size > 0, artifact
    doc = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert doc["scenario"] == name and "machine" in doc and "config" in doc
    runs = runs_of(doc)
    if name in RUNS:
        assert len(runs) == RUNS[name] + (name == "binary" and trial.peer_unavailable("mosec") is None)
    for run in runs:
        check_run(run, may_fail=name in MAY_FAIL)
    assert no_process_left(tmp_path)
    findings = doc.get("findings", {})
    if name == "batching":
        assert set(findings["batching"]["mean_batch_size"]) == {"on", "off"}
        assert findings["batching"]["mean_batch_size"]["off"] == 1.0
    if name == "ring":
        points = findings["ring"]["points"]
        assert [p["nodes"] for p in points] == [3, 4]
        assert all(p["moved_to_others_on_add"] == 0 for p in points)
    if name == "client" and shutil.which("wrk"):
        assert findings["wrk"]["throughput_rps"] > 0
    if name == "failover":
        f = findings["failover"]
        assert f["member_ttl_ms"] == 1000
        assert f["events_s"]["kill"] < f["events_s"]["back"]
        assert f["back_after_kill_s"] is not None
        assert f["failed"] == runs[0]["summary"]["failed"]
        assert len(f["series"]["t"]) == len(f["series"]["throughput_rps"]) > 0
    if name == "hotkey":
        levels = findings["hotkey"]["levels"]
        assert [p["concurrent"] for p in levels] == [4]  # --tiny: --concurrent 4, the only level
        assert runs[0]["config"]["model"] == "heavy"  # a hot key can overload a heavy worker, not a digits one
        modes = levels[0]["modes"]
        assert [m["load_factor"] for m in modes.values()] == [1.25, 0.0]
        for m, run in zip(modes.values(), runs, strict=True):
            assert m["in_flight"]["samples"] > 0 and m["in_flight"]["max_busiest_rows"] > 0
            assert m["spilled"] == sum(m["spilled_per_node"].values()) <= m["routed"]
            assert m["failed"] == run["summary"]["failed"]
            assert m["throughput_rps_rounds"] == [m["throughput_rps"]] == [run["summary"]["throughput_rps"]]
        assert modes["unbounded"]["spilled"] == 0
    if name == "redis-restart":
        check_redis_restart(findings["redis-restart"], runs[0])
    if name == "join":
        j = findings["join"]
        assert j["added"] == "worker_3" and j["initial_nodes"] == ["worker_1", "worker_2"]
        assert j["events_s"]["announced"] is not None and j["events_s"]["shown"] is not None
        assert "worker_3" in j["requests_per_node_after"]
        check_observed_moves(j["observed"])
        assert seen_sum(j["observed"], "moved_to_new", "moved_between_old") == j["observed"]["moved"]
        assert 0 < j["computed"]["moved_share"] < 1
    if name == "leave":
        lv = findings["leave"]
        assert lv["leaver"] == "worker_2" and lv["initial_nodes"] == ["worker_1", "worker_2", "worker_3"]
        assert lv["events_s"]["unannounced"] is not None and lv["events_s"]["gone"] is not None
        assert "worker_2" not in lv["requests_per_node_after"]
        check_observed_moves(lv["observed"])
        assert seen_sum(lv["observed"], "leaver_keys_moved", "moved_others") == lv["observed"]["moved"]
    if name == "binary":
        d = findings["binary"]["models"]["digits"]
        assert set(d["apis"]) == {"v2", "binary"} and d["ceiling_rows_per_s"] > 0
        assert all(a["failed"] == 0 and a["throughput_rps"] > 0 for a in d["apis"].values())
        peer = d["peer_best_json"]
        assert peer["system"] == "mosec"
        if trial.peer_unavailable("mosec") is None:
            assert peer["setting"] == {"workers": 1, "max_wait_ms": 5} and peer["failed"] == 0
            assert d["binary_over_peer_best_json"] == d["apis"]["binary"]["throughput_rps"] / peer["throughput_rps"]
        else:
            assert peer["skipped"] and "binary_over_peer_best_json" not in d
    if name == "soak":
        s = findings["soak"]
        assert {"redis_used_memory", "gateway_rss", "worker_1_rss", "redis_rss"} <= set(s["memory"])
        assert all(m["first_mb"] > 0 and m["last_mb"] > 0 for m in s["memory"].values())
    if name == "floor":
        assert set(runs[0]["server"]["cpu"]["cpu_ms_per_request"]) == {"web", "client", "other"}
        assert findings["floor"]["throughput_rps"] == runs[0]["summary"]["throughput_rps"]
        assert "vs floor" not in (tmp_path / "performance_report.txt").read_text()
    if name == "compare":
        check_compare(findings, runs, (tmp_path / "performance_report.txt").read_text())
    if name == "cache":
        check_cache(findings["cache"], runs)
    if name == "sharding":
        check_sharding(findings["sharding"], runs)


def test_load_generator_and_analysis_against_a_running_system(tmp_path: Path) -> None:
    """bench.run on its own: v2 API, Zipf keys, two client processes, the aiohttp transport; then bench.analyze."""
    with RingServe(tmp_path / "system", workers=2) as system:
        runs = []
        for transport in ("raw", "aiohttp"):
            out = tmp_path / transport
            args = ["--url", system.url, "--api", "v2", "--zipf", "1.1", "--keys", "100", "--processes", "2"]
            args += ["--requests", "40", "--concurrent", "4", "--warmup", "4", "--transport", transport]
            done = bench("bench.run", *args, "--run-dir", str(system.run_dir), "--out", str(out), "--label", transport)
            assert done.returncode == 0, done.stderr[-3000:]
            runs.append(out)
    for out in runs:
        doc = json.loads((out / RESULTS_FILE).read_text())
        check_run(doc)
        assert doc["client"]["processes"] == 2
        assert {"gateway", "worker_1", "redis", "client", "other"} <= set(doc["server"]["cpu"]["cpu_s"])
    merged = tmp_path / "merged"
    done = bench("bench.analyze", str(runs[0]), str(runs[1] / RESULTS_FILE), "--out", str(merged))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["label"] for r in runs_of(json.loads((merged / RESULTS_FILE).read_text()))] == ["raw", "aiohttp"]
    for artifact in LOAD_ARTIFACTS:
        assert (merged / artifact).stat().st_size > 0


def test_run_script_bench_subcommand(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ROOT / "docker-free-run.sh"), "bench", "ring", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "keys moved" in done.stdout.lower() or "moved on add" in done.stdout


@pytest.mark.parametrize("delay_s", [0.0, 1.0], ids=["while-starting", "while-loading"])
def test_sigterm_stops_everything_the_scenario_started(tmp_path: Path, delay_s: float) -> None:
    """Interrupted while the run script still starts the system (the worker is up, the gateway not yet
    answering: a worker stopped while it boots takes 20 s), or while the load runs."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.scenario",
            "light",
            "--tiny",
            "--requests",
            "1000000",
            "--duration",
            "60",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_dir = tmp_path / "run" / "light"
        worker_log = run_dir / "logs" / "worker_1.log"

        def worker_ready() -> bool:
            return worker_log.exists() and "ready." in worker_log.read_text() and "gateway" in supervised_pids(run_dir)

        wait_until(worker_ready, 60, "the worker to be ready")
        assert proc.poll() is None
        pids = list(procs.with_environment("RINGSERVE_RUN_DIR", str(run_dir)))
        assert len(pids) >= 5  # supervisord, redis, a worker, the gateway (and its forks), flower
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert not [pid for pid in pids if (s := procs.stat(pid)) is not None and s.state != "Z"]  # exited (zombies too)
    assert no_process_left(tmp_path)
    assert os.path.exists(tmp_path / "run" / "light" / "logs" / "gateway.log")


def test_no_secret_reaches_results_logs_or_plots(tmp_path: Path) -> None:
    """A scenario against a system with an API key and a known Redis password: the load authenticates,
    and no file the scenario leaves (results, report, plots, logs) holds either secret."""
    api_key, password = "bench-api-key-7c2e", "bench-redis-password-91ad"
    secrets = tmp_path / "run" / "light" / "secrets"
    secrets.mkdir(parents=True, mode=0o700)
    (secrets / "redis.password").write_text(password + "\n")  # the run script keeps a password it finds
    done = bench("bench.scenario", "light", "--tiny", "--out", str(tmp_path), env={"RINGSERVE_API_KEYS": api_key})
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs_of(json.loads((tmp_path / RESULTS_FILE).read_text()))[0]
    assert run["summary"]["failed"] == 0  # every request carried the key
    assert run["config"]["settings"]["API_KEYS"] == "***"
    for secret in (api_key, password):
        assert secret not in done.stdout + done.stderr
        for path in tmp_path.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
