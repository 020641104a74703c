"""One measured configuration: start a system (ringserve or a peer), warm it up, load it, stop it.

Every scenario that sends load is a list of trials run one after the other, never at once.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter
from bench.loadgen import Load, Meter, run_load
from bench.results import run_document
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


def peer(
    scenario: str,
    name: str,
    load: Load,
    machine: dict[str, Any],
    workers: int,
    warmup: int = WARMUP_REQUESTS,
) -> dict[str, Any]:
    """A run against peer ``name`` of :mod:`bench.peers`; its CPU is the machine's less the client's."""
    try:
        from bench import peers
    except ImportError as exc:
        raise PeerUnavailable(f"bench.peers cannot be imported: {exc}") from None
    why = peers.unavailable(name)
    if why is not None:
        raise PeerUnavailable(why)
    running: AbstractContextManager[str] = peers.running_peer(name, load.model, workers, free_port())
    try:
        with running as url:
            load = dataclasses.replace(load, url=url)
            warm_up(load, warmup)
            meter = CpuMeter({})
            result = run_load(load, name, meter=meter)
    except peers.PeerStartError as exc:
        raise PeerUnavailable(f"did not start: {exc}") from exc
    successful = sum(r.ok for r in result.records)
    config = {**load.config(), "system": name, "workers": workers, "warmup_requests": warmup}
    cpu = meter.report(successful, result.cpu_s, rest=f"{name} and the rest")
    return run_document(scenario, name, config, machine, result, {"cpu": cpu})
