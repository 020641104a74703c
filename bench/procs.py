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


class Memory(NamedTuple):
    """What one process holds (bytes): anonymous memory, the resident part of its mappings of one file,
    and its peak resident set (VmHWM: anonymous and file-backed, the most it ever held at once)."""

    anonymous: int
    mapped: int
    peak_rss: int

    @property
    def total(self) -> int:
        """Memory the process holds that no other process would: anonymous plus the file's resident pages."""
        return self.anonymous + self.mapped


_KB = 1024


def memory(pid: int, mapped: Path | None = None) -> Memory | None:
    """``Anonymous:`` summed over /proc/<pid>/smaps, plus the ``Rss:`` of the mappings of ``mapped`` (e.g. a
    table that a process may map rather than copy), and VmHWM. None once the process is gone."""
    target = str(mapped.resolve()) if mapped is not None else None
    anonymous = resident = 0
    in_target = False
    try:
        with (PROC / str(pid) / "smaps").open() as smaps:
            for line in smaps:
                name, _, rest = line.partition(" ")
                if not name.endswith(":"):  # a mapping's header: "start-end perms offset dev inode [path]"
                    fields = line.split(maxsplit=5)
                    in_target = target is not None and len(fields) == 6 and fields[5].strip() == target
                elif name == "Anonymous:":
                    anonymous += int(rest.split()[0]) * _KB
                elif name == "Rss:" and in_target:
                    resident += int(rest.split()[0]) * _KB
        status = (PROC / str(pid) / "status").read_text()
    except (OSError, ValueError):
        return None
    peak = next((int(line.split()[1]) * _KB for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return Memory(anonymous, resident, peak)
