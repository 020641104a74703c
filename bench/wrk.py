"""wrk (a C load generator) against the same target, for judging our own client: is it the bottleneck?

wrk replays requests prepared by a Lua script: the same bodies our client would send, with keys
drawn from the same key space. Its own CPU time is read from the rusage of waited-for children.
"""

from __future__ import annotations

import math
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench import auth
from bench.loadgen import Load
from bench.payload import Bodies
from tasks.metadata import load_repository

PREPARED_REQUESTS = 1000
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def available() -> bool:
    return shutil.which("wrk") is not None


def lua_script(load: Load) -> str:
    """A wrk script that sends PREPARED_REQUESTS bodies (random keys of the load's key space) at random."""
    meta = load_repository(load.model_repository)[load.model]
    bodies = Bodies(meta, load.api, seed=load.seed)
    path = load.target(bodies).split("/", 3)[3]
    keys = load.keys.sample(PREPARED_REQUESTS, seed=load.seed).tolist()
    sent = {"Content-Type": "application/json", **auth.headers()}
    table = ", ".join(f'["{name}"] = "{value}"' for name, value in sent.items())
    lines = [f"local headers = {{{table}}}", "local reqs = {}", "init = function(args)"]
    for i, key in enumerate(keys):
        body = bodies.body(f"user-{key}", key).decode()
        lines.append(f'  reqs[{i + 1}] = wrk.format("POST", "/{path}", headers, [==[{body}]==])')
    lines += ["end", "request = function() return reqs[math.random(#reqs)] end"]
    return "\n".join(lines) + "\n"


def parse(output: str) -> dict[str, Any]:
    """Throughput, latency percentiles (ms), requests and non-2xx answers from ``wrk --latency``."""

    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return float(number) * UNITS_MS[unit]

    percentiles = {f"p{p}": ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.MULTILINE)}
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "requests": int(done.group(1)) if done else None,
        "duration_s": ms(done.group(2) + done.group(3)) / 1000 if done else None,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "latency_ms": percentiles,
    }


def run(load: Load, threads: int = 2) -> dict[str, Any]:
    """Run wrk for ``load.duration_s`` with ``load.concurrent`` connections; its figures and its CPU use."""
    if load.duration_s is None:
        raise ValueError("wrk runs for a duration: give the load one")
    seconds = max(1, math.ceil(load.duration_s))  # wrk takes whole seconds
    meta = load_repository(load.model_repository)[load.model]
    url = load.target(Bodies(meta, load.api))
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
