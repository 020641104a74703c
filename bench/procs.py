"""Processes as /proc shows them: state, start time, CPU seconds, the tree below a pid, who carries a marker (Linux)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")


class Stat(NamedTuple):
    """The fields of /proc/<pid>/stat we use (stat(5): state 3, ppid 4, utime 14, stime 15, starttime 22)."""

    state: str
    ppid: int
    cpu_s: float  # user + system
    start_ticks: int  # since boot: with the pid, identifies a process (pids are reused)


def stat(pid: int) -> Stat | None:
    """None once the process is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ", which may hold spaces
    return Stat(fields[0], int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S, int(fields[19]))


def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process now alive."""
    tree: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (s := stat(int(entry.name))) is not None:
            tree.setdefault(s.ppid, []).append(int(entry.name))
    return tree


def descendants(root: int, tree: Mapping[int, list[int]]) -> list[int]:
    """``root`` and every process below it."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, ()))
    return found


def with_environment(name: str, value: str) -> dict[int, int]:
    """pid -> start time of every live process whose environment has ``name=value`` (children inherit it)."""
    marker = f"{name}={value}".encode()
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        s = stat(int(entry.name))
        if marker in environ.split(b"\0") and s is not None and s.state != "Z":
            found[int(entry.name)] = s.start_ticks
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident memory of one live process (None once it is gone)."""
    try:
        pages = int((PROC / str(pid) / "statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * PAGE_BYTES
