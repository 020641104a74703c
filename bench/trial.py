"""One measured configuration: start a system (ringserve or a peer), warm it up, load it, stop it.

Every scenario that sends load is a list of trials run one after the other, never at once. Our
client drives ringserve where it is fast enough (:func:`measure`); wrk drives any server that may
outrun it (:func:`by_wrk`, against a :class:`Target`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import wrk
from bench.cpu import CpuMeter
from bench.loadgen import Load, Meter, run_load
from bench.results import run_document, wrk_run_document
from bench.system import RingServe, free_port, stats_delta

WARMUP_REQUESTS = 200


def warm_up(load: Load, requests: int) -> None:
    """Send a few requests first: the first ones pay for connections, caches and lazy loads."""
    if requests > 0:
        run_load(dataclasses.replace(load, requests=requests, duration_s=None), progress=False)


class _Meters:
    """Several meters started and stopped as one, in order (the load's start and end)."""

    def __init__(self, *meters: Meter) -> None:
        self.meters = meters

    def start(self) -> None:
        for m in self.meters:
            m.start()

    def stop(self) -> None:
        for m in self.meters:
            m.stop()


class _Following:
    """A CPU meter that, when it stops, also meters the processes started meanwhile (from 0): a worker
    added or restarted during the load (a restarted one as ``<name>_restarted``)."""

    def __init__(self, meter: CpuMeter, system: RingServe) -> None:
        self.meter = meter
        self.system = system

    def start(self) -> None:
        self.meter.start()

    def stop(self) -> None:
        known = set(self.meter.groups.values())
        for name, pid in self.system.pids().items():
            if pid not in known:
                self.meter.groups[name if name not in self.meter.groups else f"{name}_restarted"] = pid
        self.meter.stop()


def measure(
    system: RingServe,
    scenario: str,
    label: str,
    load: Load,
    machine: dict[str, Any],
    warmup: int = WARMUP_REQUESTS,
    during: Meter | None = None,
) -> dict[str, Any]:
    """One run against a running ringserve, with the CPU each of its processes spent.

    ``during`` is started when the load starts and stopped when it has ended (after the CPU meter):
    what a scenario does to the system meanwhile (kill a worker, add one, sample /stats).
    """
    load = dataclasses.replace(load, url=system.url)
    system.wait_tables()
    warm_up(load, warmup)
    meter = CpuMeter(system.pids())
    before = system.stats()
    result = run_load(load, label, meter=meter if during is None else _Meters(_Following(meter, system), during))
    after = system.stats()
    successful = sum(r.ok for r in result.records)
    server = {"cpu": meter.report(successful, result.cpu_s), "stats": stats_delta(before, after)}
    config = {**load.config(), **system.config(), "warmup_requests": warmup}
    return run_document(scenario, label, config, machine, result, server)


def served(
    scenario: str,
    label: str,
    load: Load,
    machine: dict[str, Any],
    run_dir: Path,
    workers: int,
    settings: dict[str, str] | None = None,
    warmup: int = WARMUP_REQUESTS,
) -> dict[str, Any]:
    """One run against a ringserve started for it (and stopped after)."""
    with RingServe(run_dir, workers, settings) as system:
        return measure(system, scenario, label, load, machine, warmup)


KNOWN_PEERS = ("naive", "mosec", "ray")


def known_peers() -> tuple[str, ...]:
    """The peers :mod:`bench.peers` offers (the agreed names if it cannot be imported: each is then skipped)."""
    try:
        from bench import peers
    except ImportError:
        return KNOWN_PEERS
    return tuple(peers.PEERS)


class PeerUnavailable(Exception):
    """A peer that cannot run here (not installed, or did not start); the message says why."""


@dataclass(frozen=True)
class Target:
    """A server that answers: where to POST, the root pid of each process tree to meter, what results record
    of it, and its counters when it keeps them (ringserve's /stats: requests per node, batch sizes)."""

    url: str
    pids: Mapping[str, int]
    config: dict[str, Any]
    stats: Callable[[], dict[str, Any]] | None = None


def ringserve_target(system: RingServe) -> Target:
    """``system`` as wrk measures it, once its sharded tables are loaded."""
    system.wait_tables()
    return Target(system.url, system.pids(), system.config(), system.stats)


def peer_unavailable(name: str) -> str | None:
    """None when peer ``name`` can run here, else why not (also when :mod:`bench.peers` cannot be imported)."""
    try:
        from bench import peers
    except ImportError as exc:
        return f"bench.peers cannot be imported: {exc}"
    return peers.unavailable(name)


@contextmanager
def peer_target(name: str, model: str, workers: int, settings: Mapping[str, str] | None = None) -> Iterator[Target]:
    """Peer ``name`` of :mod:`bench.peers` started for a measurement (and stopped after); raises
    PeerUnavailable when it cannot run here or does not start."""
    why = peer_unavailable(name)
    if why is not None:
        raise PeerUnavailable(why)
    from bench import peers

    config = {"system": name, "workers": workers, "settings": dict(settings or {})}
    running: AbstractContextManager[peers.RunningPeer] = peers.running_peer(name, model, workers, free_port(), settings)
    try:
        with running as peer:
            yield Target(peer.url, peer.pids, config)
    except peers.PeerStartError as exc:
        raise PeerUnavailable(f"did not start: {exc}") from exc


def _mean_batch_size(histogram: Mapping[str, int]) -> float:
    """Rows per forward from /stats' {rows: forwards} (NaN without forwards)."""
    forwards = sum(histogram.values())
    return sum(int(rows) * n for rows, n in histogram.items()) / forwards if forwards else math.nan


def by_wrk(
    scenario: str,
    label: str,
    target: Target,
    load: Load,
    machine: dict[str, Any],
    threads: int = 2,
    warmup: int = WARMUP_REQUESTS,
) -> dict[str, Any]:
    """One run of ``load.duration_s`` driven by wrk (``load.concurrent`` connections), with the CPU each of
    the target's process trees and wrk spent: for servers faster than our client (60–90 µs CPU per
    request) can measure without becoming the limit."""
    load = dataclasses.replace(load, url=target.url)
    warm_up(load, warmup)
    meter = CpuMeter(target.pids)
    before = target.stats() if target.stats is not None else {}
    meter.start()
    result = wrk.run(load, threads)
    meter.stop()
    server: dict[str, Any] = {}
    nodes, mean_batch = None, math.nan
    if target.stats is not None:
        server["stats"] = stats_delta(before, target.stats())
        nodes = server["stats"]["requests_per_node"]
        mean_batch = _mean_batch_size(server["stats"]["batch_size_histogram"])
    summary = wrk.summary(result, mean_batch, nodes)
    server["cpu"] = meter.report(summary["successful"], result["cpu_s"])
    shown = {k: v for k, v in load.config().items() if k not in ("requests", "processes", "transport")}
    config = {**shown, "client": wrk.client(result)["tool"], **target.config, "warmup_requests": warmup}
    return wrk_run_document(scenario, label, config, machine, result, summary, server)
