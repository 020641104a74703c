"""wrk (a C load generator) against the same target: for servers faster than our client can measure,
and for judging our own client (is it the bottleneck?).

wrk replays requests prepared by a Lua script: the same bodies our client would send, with keys
drawn from the same key space. The script's ``done`` hook prints wrk's exact figures (latency
percentiles and :data:`QUANTILES` quantiles, errors) as one JSON line. Its own CPU time is read
from the rusage of waited-for children.
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench import auth
from bench.loadgen import SATURATED_CPU_FRACTION, Load
from bench.payload import BinaryBodies, bodies_for
from bench.stats import LATENCY_KEYS, balance, histogram
from tasks.metadata import load_repository

PREPARED_REQUESTS = 1000
PREPARED_BINARY = 64  # binary bodies are written as escapes, 4 characters a byte: fewer, larger
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
QUANTILES = 200  # latency quantiles done() prints: the shape of the distribution, for the plots
DONE_PREFIX = "bench-wrk-done: "
# wrk calls done() once, after the run, with its merged statistics in microseconds (wrk's SCRIPTING).
DONE = r"""done = function(summary, latency, requests)
  local e, q = summary.errors, {}
  for i = 0, quantiles - 1 do q[#q + 1] = string.format("%.0f", latency:percentile(100 * (i + 0.5) / quantiles)) end
  io.write(string.format(prefix .. '{"requests": %.0f, "duration_us": %.0f, "errors": {"connect": %.0f, '
    .. '"read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f}, "latency_us": {"mean": %.3f, '
    .. '"std": %.3f, "max": %.0f, "p50": %.0f, "p95": %.0f, "p99": %.0f, "p999": %.0f}, "quantiles_us": [%s]}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency.mean,
    latency.stdev, latency.max, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency:percentile(99.9), table.concat(q, ", ")))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def lua_script(load: Load) -> str:
    """A wrk script that sends PREPARED_REQUESTS bodies (random keys of the load's key space) at random."""
    meta = load_repository(load.model_repository)[load.model]
    bodies = bodies_for(meta, load.api, seed=load.seed)
    path = load.target(bodies).split("/", 3)[3]
    count = PREPARED_BINARY if isinstance(bodies, BinaryBodies) else PREPARED_REQUESTS
    keys = load.keys.sample(count, seed=load.seed).tolist()
    sent = {"Content-Type": "application/json", **auth.headers()}
    lines = [f"local headers = {_lua_table(sent)}", "local reqs = {}", "init = function(args)"]
    for i, key in enumerate(keys):
        if isinstance(bodies, BinaryBodies):  # raw bytes: a Lua string of decimal escapes, and its own header
            raw, extra = bodies.request(key)
            body, hdrs = '"' + "".join(f"\\{b}" for b in raw) + '"', _lua_table({**sent, **extra})
        else:
            body, hdrs = f"[==[{bodies.body(f'user-{key}', key).decode()}]==]", "headers"
        lines.append(f'  reqs[{i + 1}] = wrk.format("POST", "/{path}", {hdrs}, {body})')
    lines += ["end", "request = function() return reqs[math.random(#reqs)] end"]
    lines.append(f'local quantiles, prefix = {QUANTILES}, "{DONE_PREFIX}"')
    return "\n".join(lines) + "\n" + DONE


def _lua_table(headers: dict[str, str]) -> str:
    return "{" + ", ".join(f'["{name}"] = "{value}"' for name, value in headers.items()) + "}"


def parse(output: str) -> dict[str, Any]:
    """Throughput, latency percentiles (ms), requests and non-2xx answers from ``wrk --latency``;
    with our script's ``done`` line, also every latency key of a summary, quantiles and every error."""

    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return float(number) * UNITS_MS[unit]

    percentiles = {f"p{p}": ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.MULTILINE)}
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result: dict[str, Any] = {
        "throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "requests": int(done.group(1)) if done else None,
        "duration_s": ms(done.group(2) + done.group(3)) / 1000 if done else None,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "latency_ms": percentiles,
    }
    exact = [line.removeprefix(DONE_PREFIX) for line in output.splitlines() if line.startswith(DONE_PREFIX)]
    if exact:
        figures = json.loads(exact[-1])
        result.update(
            {
                "requests": int(figures["requests"]),
                "duration_s": figures["duration_us"] / 1e6,
                "errors": {k: int(v) for k, v in figures["errors"].items()},
                "latency_ms": {k: v / 1000 for k, v in figures["latency_us"].items()},
                "quantiles_ms": [v / 1000 for v in figures["quantiles_us"]],
            }
        )
    return result


def run(load: Load, threads: int = 2) -> dict[str, Any]:
    """Run wrk for ``load.duration_s`` with ``load.concurrent`` connections; its figures and its CPU use."""
    if load.duration_s is None:
        raise ValueError("wrk runs for a duration: give the load one")
    seconds = max(1, math.ceil(load.duration_s))  # wrk takes whole seconds
    meta = load_repository(load.model_repository)[load.model]
    url = load.target(bodies_for(meta, load.api))
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(lua_script(load))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{load.concurrent}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse(done.stdout)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.update(
        {
            "threads": threads,
            "connections": load.concurrent,
            "cpu_s": cpu_s,
            "cpu_percent": 100 * cpu_s / (result["duration_s"] or seconds),
            "cpu_us_per_request": 1e6 * cpu_s / max(result["requests"] or 1, 1),
        }
    )
    return result


def summary(
    result: dict[str, Any], mean_batch_size: float = math.nan, nodes: dict[str, int] | None = None
) -> dict[str, Any]:
    """A run's summary (:data:`bench.stats.SUMMARY_KEYS`) from wrk's figures.

    wrk does not read replies: a non-2xx answer or a socket error counts as one failed request, and
    the latencies are every answer's. ``nodes`` and ``mean_batch_size`` come from the server when it
    says (ringserve's /stats), else there are none.
    """
    errors = result.get("errors")
    socket = sum(errors[k] for k in ("connect", "read", "write", "timeout")) if errors else result["socket_errors"]
    answered = result["requests"] or 0
    successful = answered - result["non_2xx"]
    failed = {k: v for k, v in (("non_2xx", result["non_2xx"]), ("no_response", socket)) if v}
    duration = result["duration_s"] or 0.0
    nodes = dict(sorted((nodes or {}).items()))
    return {
        "requests": answered + socket,
        "successful": successful,
        "failed": sum(failed.values()),
        "failed_by_status": failed,
        "duration_s": duration,
        "throughput_rps": successful / duration if duration > 0 else 0.0,
        "latency_ms": {k: result["latency_ms"].get(k, math.nan) for k in LATENCY_KEYS},
        "nodes": nodes,
        "balance": balance(nodes),
        "mean_batch_size": mean_batch_size,
        "client_cpu_percent": result["cpu_percent"],
    }


def client(result: dict[str, Any]) -> dict[str, Any]:
    """wrk's own cost in the shape of our client's (``LoadResult.client``): could it drive this server?"""
    cpu_s, threads = result["cpu_s"], result["threads"]
    return {
        "tool": f"wrk -t{threads} -c{result['connections']}",
        "processes": 1,
        "cpu_s": cpu_s,
        "cpu_percent_by_process": [round(result["cpu_percent"], 1)],
        "cpu_us_per_request": result["cpu_us_per_request"],
        "capacity_rps_per_core": (result["requests"] or 0) / cpu_s if cpu_s > 0 else None,
        "saturated": result["cpu_percent"] >= 100 * SATURATED_CPU_FRACTION * threads,
        "successful": (result["requests"] or 0) - result["non_2xx"],
    }


def latency_histogram(result: dict[str, Any]) -> dict[str, list[float]]:
    """A latency histogram (``bench.stats.histogram``'s shape) rebuilt from wrk's quantiles, its counts
    scaled to the answers: wrk keeps no per-request records, and this is the distribution's shape."""
    quantiles = result.get("quantiles_ms") or []
    shape = histogram(quantiles)
    scale = (result["requests"] or 0) / max(len(quantiles), 1)
    return {"edges": shape["edges"], "counts": [round(c * scale) for c in shape["counts"]]}
