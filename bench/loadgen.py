"""Closed-loop load: ``concurrent`` simulated users, each sending its next request when its last one ended.

Users are asyncio tasks spread over ``processes`` client processes (each one core at most), so
the client can be given more than one core when one is not enough. Every client process connects
first, then all start together; each reports its records and its own CPU time, which is how a run
knows whether the client, rather than the system, was the limit.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench.keys import KeySpace
from bench.payload import BinaryBodies, Bodies
from bench.pool import RequestPool
from bench.progress import Progress
from bench.record import NO_RESPONSE, Record
from bench.transport import Connection, HttpError, connection
from tasks.metadata import load_repository
from tasks.settings import MODEL_REPOSITORY

MAX_RUN_S = 600.0  # a run given only a request count still stops after this long
SATURATED_CPU_FRACTION = 0.9  # a client process busier than this was (close to) the bottleneck
KEY_DRAWS = 100_000  # keys drawn up front per process; longer runs cycle through them
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Load:
    """What to send, how much and how fast. ``url``: a full URL, or a base to which the API path is added."""

    url: str
    model: str = "digits"
    api: str = "infer"
    requests: int | None = 1000
    duration_s: float | None = None
    concurrent: int = 20
    processes: int = 1
    keys: KeySpace = field(default_factory=KeySpace)
    seed: int = 0
    timeout_s: float = 30.0
    transport: str = "raw"
    model_repository: str = MODEL_REPOSITORY
    pool: str | None = None  # a RequestPool file: send its requests (key i: request i) and check every answer

    def __post_init__(self) -> None:
        if self.requests is None and self.duration_s is None:
            raise ValueError("a load needs a request count, a duration, or both")
        if self.concurrent < 1 or self.processes < 1 or self.processes > self.concurrent:
            raise ValueError(f"need 1 <= processes <= concurrent, got {self.processes} and {self.concurrent}")

    def target(self, bodies: Bodies | BinaryBodies | RequestPool) -> str:
        """The URL to POST: ``url`` itself when it has a path, else ``url`` + the API's path."""
        return self.url if urlsplit(self.url).path not in ("", "/") else self.url.rstrip("/") + bodies.path

    def shares(self) -> list[tuple[int, int | None]]:
        """(users, requests) of each client process: users split evenly, requests in proportion."""
        users = [
            self.concurrent // self.processes + (i < self.concurrent % self.processes) for i in range(self.processes)
        ]
        if self.requests is None:
            return [(u, None) for u in users]
        counts = [self.requests * u // self.concurrent for u in users]
        counts[0] += self.requests - sum(counts)
        return list(zip(users, counts, strict=True))

    def config(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "api": self.api,
            "requests": self.requests,
            "duration_s": self.duration_s,
            "concurrent": self.concurrent,
            "processes": self.processes,
            "keys": self.keys.describe(),
            "key_space": self.keys.size,
            "zipf": self.keys.zipf,
            "transport": self.transport,
            "timeout_s": self.timeout_s,
            **({"pool": self.pool} if self.pool else {}),
        }


@dataclass(frozen=True)
class ClientShare:
    """What one client process did: its records and its CPU seconds over its wall seconds."""

    records: list[Record]
    cpu_s: float
    wall_s: float

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class LoadResult:
    records: list[Record]  # sorted by start; times from the first start
    shares: list[ClientShare]
    origin_s: float = 0.0  # time.monotonic() at the first start: records' times + this = this machine's monotonic clock

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.shares)

    @property
    def saturated(self) -> bool:
        """Some client process was busy nearly all the time: the figures may be the client's limit."""
        return any(s.cpu_fraction >= SATURATED_CPU_FRACTION for s in self.shares)

    def client(self) -> dict[str, Any]:
        """The client's own cost, for the results file: is it fast enough to measure this system?"""
        ok = sum(r.ok for r in self.records)
        return {
            "processes": len(self.shares),
            "cpu_s": self.cpu_s,
            "cpu_percent_by_process": [round(100 * s.cpu_fraction, 1) for s in self.shares],
            "cpu_us_per_request": 1e6 * self.cpu_s / max(len(self.records), 1),
            "capacity_rps_per_core": len(self.records) / self.cpu_s if self.cpu_s > 0 else None,
            "saturated": self.saturated,
            "successful": ok,
            "origin_monotonic_s": self.origin_s,
        }


class Meter(Protocol):
    """Watches something (e.g. CPU use) from the moment the load starts until it has ended."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_load(load: Load, label: str = "load", progress: bool = True, meter: Meter | None = None) -> LoadResult:
    """Run ``load`` to completion in ``load.processes`` client processes and gather every record."""
    ctx = multiprocessing.get_context("spawn")
    shares = load.shares()
    counters: SynchronizedArray[Any] = ctx.Array("q", 2 * len(shares), lock=False)  # type: ignore[assignment]
    ready = ctx.Semaphore(0)  # released once by each client process when it has connected
    go = ctx.Event()
    results: multiprocessing.Queue[tuple[int, list[tuple[Any, ...]], float, float]] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client_process,
            args=(i, load, users, requests, ready, go, counters, results),
            name=f"bench-client-{i}",
            daemon=True,
        )
        for i, (users, requests) in enumerate(shares)
    ]
    for p in procs:
        p.start()
    gathered: dict[int, ClientShare] = {}
    bar: Progress | None = None
    finished = False
    try:
        _await_ready(ready, procs)
        go.set()
        bar = Progress(label, load.requests) if progress else None
        if meter is not None:
            meter.start()
        while len(gathered) < len(procs):
            try:
                index, rows, cpu_s, wall_s = results.get(timeout=0.1)
                gathered[index] = ClientShare([Record(*row) for row in rows], cpu_s, wall_s)
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"client processes failed: {dead}") from None
            if bar is not None:
                bar.update(*_totals(counters))
        if meter is not None:
            meter.stop()
        if bar is not None:
            bar.close(*_totals(counters))
        finished = True
    finally:
        for p in procs:  # after an error or Ctrl-C, stop the clients at once
            p.join(5 if finished else 0)
            if p.is_alive():
                p.terminate()
                p.join()
    origin = min((r.start_s for s in gathered.values() for r in s.records), default=0.0)
    records = sorted((r.shifted(origin) for s in gathered.values() for r in s.records), key=lambda r: r.start_s)
    result = LoadResult(records, [gathered[i] for i in sorted(gathered)], origin)
    if result.saturated:
        busy = ", ".join(f"{100 * s.cpu_fraction:.0f}%" for s in result.shares)
        print(
            f"WARNING {label}: a client process kept its core busy ({busy}): the client may have been the limit;"
            " try --processes",
            file=sys.stderr,
        )
    return result


def _await_ready(ready: Any, procs: list[Any]) -> None:
    """Wait until every client process has connected; fail at once if one dies (e.g. no server)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for _ in procs:
        while not ready.acquire(timeout=0.1):
            failed = {p.name: p.exitcode for p in procs if p.exitcode not in (None, 0)}
            if failed:
                raise RuntimeError(f"client processes failed to start (exit codes {failed}); see their errors above")
            if time.monotonic() > deadline:
                raise RuntimeError(f"client processes did not connect within {START_TIMEOUT_S:g} s")


def _totals(counters: Any) -> tuple[int, int]:
    values = list(counters)
    return sum(values[0::2]), sum(values[1::2])


def _client_process(
    index: int,
    load: Load,
    users: int,
    requests: int | None,
    ready: Any,
    go: Any,
    counters: Any,
    results: Any,
) -> None:
    if load.pool is not None:
        bodies: Bodies | RequestPool = RequestPool.read(load.pool)
    else:
        bodies = Bodies(load_repository(Path(load.model_repository))[load.model], load.api, seed=load.seed)
    draws = load.keys.sample(min(requests or KEY_DRAWS, KEY_DRAWS), seed=load.seed * 1000 + index)
    rows, cpu_s, wall_s = asyncio.run(_drive(index, load, bodies, users, requests, draws.tolist(), ready, go, counters))
    results.put((index, rows, cpu_s, wall_s))


async def _drive(
    index: int,
    load: Load,
    bodies: Bodies | RequestPool,
    users: int,
    requests: int | None,
    draws: list[int],
    ready: Any,
    go: Any,
    counters: Any,
) -> tuple[list[tuple[Any, ...]], float, float]:
    url = load.target(bodies)
    conns = [connection(load.transport, url) for _ in range(users)]
    await asyncio.gather(*(c.open() for c in conns))
    ready.release()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    cpu0, wall0 = time.process_time(), time.monotonic()
    deadline = wall0 + min(load.duration_s or MAX_RUN_S, MAX_RUN_S)
    numbers: Iterator[int] = iter(range(requests)) if requests is not None else itertools.count()
    rows: list[tuple[Any, ...]] = []
    ok_slot, err_slot = 2 * index, 2 * index + 1

    async def user(conn: Connection) -> None:
        for n in numbers:
            if time.monotonic() >= deadline:
                return
            key = draws[n % len(draws)]
            body = bodies.body(KeySpace.name(key), key)
            start = time.monotonic()
            try:
                status, answer = await conn.post(body, load.timeout_s)
            except (TimeoutError, OSError, HttpError) as exc:
                rows.append((start, time.monotonic(), NO_RESPONSE, None, None, None, type(exc).__name__, key))
                counters[err_slot] += 1
                continue
            end = time.monotonic()
            if status != 200:
                rows.append((start, end, status, None, None, None, answer[:200].decode("utf-8", "replace"), key))
                counters[err_slot] += 1
                continue
            reply = bodies.parse(answer, key)
            error = None if reply.valid else (reply.error or "no output")
            rows.append((start, end, 200, reply.node, reply.batch_size, reply.cached, error, key))
            counters[ok_slot if reply.valid else err_slot] += 1

    try:
        await asyncio.gather(*(user(c) for c in conns))
    finally:
        cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
        for c in conns:
            await c.close()
    return rows, cpu_s, wall_s
