"""Where the CPU went during a run: seconds per process group from /proc, and the machine's total.

Per-request CPU (gateway, workers, Redis, client) is the profile that says what limits a run on
a machine whose cores every part shares. The machine total (from /proc/stat) minus everything we
can name is "other": on a shared machine, a large "other" marks a run disturbed by neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.procs import CLOCK_TICKS_PER_S, PROC, children_map, descendants, stat

NOT_SERVER = ("client", "other")  # groups of a report that are not the measured server's processes


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one live process (None once it is gone)."""
    s = stat(pid)
    return None if s is None else s.cpu_s


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS_PER_S


class CpuMeter:
    """CPU seconds spent by named process trees between :meth:`start` and :meth:`stop`.

    ``groups`` maps a name (``gateway``, ``worker_1``, ``redis``…) to the pid at the root of a
    tree; children (the gateway's forked workers) count toward their root. Processes that start
    or end in between count from 0 or up to their last reading.
    """

    def __init__(self, groups: Mapping[str, int]) -> None:
        self.groups = dict(groups)
        self._before: dict[str, dict[int, float]] = {}
        self._after: dict[str, dict[int, float]] = {}
        self._machine = (0.0, 0.0)

    def _read(self) -> dict[str, dict[int, float]]:
        tree = children_map()
        reading: dict[str, dict[int, float]] = {}
        for name, root in self.groups.items():
            seconds = {pid: process_cpu_s(pid) for pid in descendants(root, tree)}
            reading[name] = {pid: s for pid, s in seconds.items() if s is not None}
        return reading

    def start(self) -> None:
        self._before = self._read()
        self._machine = (machine_busy_s(), 0.0)

    def stop(self) -> None:
        self._after = self._read()
        self._machine = (self._machine[0], machine_busy_s())

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group over the measured interval."""
        used = {}
        for name in self.groups:
            before, after = self._before.get(name, {}), self._after.get(name, {})
            used[name] = sum(after.get(pid, before.get(pid, 0.0)) - before.get(pid, 0.0) for pid in {*before, *after})
        return used

    def report(self, requests: int, client_cpu_s: float, rest: str = "other") -> dict[str, Any]:
        """CPU seconds and CPU ms per request of each group, the client, and everything else (``rest``).

        With no groups (a peer whose processes we do not know), ``rest`` names the server plus
        whatever else ran.
        """
        used = self.seconds()
        used["client"] = client_cpu_s
        machine = self._machine[1] - self._machine[0]
        used[rest] = max(machine - sum(used.values()), 0.0)
        per_request = {k: 1000 * v / requests for k, v in used.items()} if requests else {}
        return {"machine_busy_s": machine, "cpu_s": used, "cpu_ms_per_request": per_request}


def server_ms(per_request: Mapping[str, float]) -> float:
    """The server's CPU ms per request from :meth:`CpuMeter.report`'s ``cpu_ms_per_request``: every
    metered process tree, not the client and not the rest of the machine."""
    return sum(v for k, v in per_request.items() if k not in NOT_SERVER)
