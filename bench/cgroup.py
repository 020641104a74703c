"""A worker's cgroup v1 memory cgroup, as ``./docker-free-run.sh`` makes them for ``RINGSERVE_WORKER_MEMORY_LIMIT``.

The run script records ``<node> <cgroup dir>`` for every cgroup it made in ``<run dir>/cgroups``;
a benchmark reads the limit and what the kernel counted there: usage and its peak (both include
the page cache the worker caused, which the kernel reclaims before it kills anyone) and the
OOM kills (``memory.oom_control``'s ``oom_kill``; ``memory.failcnt`` stays 0 on some kernels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CGROUPS_FILE = "cgroups"


def recorded(run_dir: Path) -> dict[str, Path]:
    """Node -> its memory cgroup directory, for every cgroup the run script made for ``run_dir``."""
    path = run_dir / CGROUPS_FILE
    if not path.exists():
        return {}
    pairs = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {node: Path(directory) for node, directory in pairs}


@dataclass(frozen=True)
class MemoryCounters:
    """Bytes, and kills, of one memory cgroup at one moment."""

    limit: int
    usage: int
    max_usage: int
    oom_kills: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def counters(directory: Path) -> MemoryCounters | None:
    """What the kernel counts for the cgroup at ``directory`` (None once it is gone)."""
    try:
        oom = dict(line.split() for line in (directory / "memory.oom_control").read_text().splitlines())
        return MemoryCounters(
            limit=int((directory / "memory.limit_in_bytes").read_text()),
            usage=int((directory / "memory.usage_in_bytes").read_text()),
            max_usage=int((directory / "memory.max_usage_in_bytes").read_text()),
            oom_kills=int(oom.get("oom_kill", 0)),
        )
    except (OSError, ValueError):
        return None
