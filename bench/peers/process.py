"""Child processes of a peer: started in their own session with a log file, stopped by pid.

A peer is a handful of processes (a server and the workers it forks, a redis-server, Ray's
daemons). :meth:`Process.stop` ends the one it started and every descendant it had at that
moment, by pid, checking each pid's start time so that a recycled pid is never signalled;
nothing is ever killed by name. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

POLL_S = 0.1
STOP_TIMEOUT_S = 20.0
TERM_AGAIN_S = 1.0  # a peer still running this long after SIGTERM gets a second one (see Process.stop)
LOG_TAIL_LINES = 40


class PeerStartError(RuntimeError):
    """A peer did not come up; the message names its log and quotes the end of it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of ``pid``, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid``, as {pid: start time}."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = starts[child]
        todo.extend(children.get(child, []))
    return found


def alive(pid: int, start: int) -> bool:
    """Whether the process ``pid`` that started at ``start`` (clock ticks) still runs (zombies do not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == start


def _signal_all(pids: Mapping[int, int], sig: int) -> None:
    for pid, start in pids.items():
        if alive(pid, start):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_gone(pids: Mapping[int, int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(alive(pid, start) for pid, start in pids.items()):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


class Process:
    """One command of a peer, logging to ``<log_dir>/<name>.log``."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            # A new session: a Ctrl-C meant for the load generator does not hit the peer
            # halfway; running_peer() stops it in order instead.
            self._popen = subprocess.Popen(
                list(argv), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self._popen.pid

    def exited(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return self._popen.poll()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of its log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to its process group, once more after :data:`TERM_AGAIN_S`, then SIGKILL after
        ``timeout_s``; then the same for descendants left over.

        granian 2.8 ignores a SIGTERM that reaches a worker still starting, and its main process
        then waits for that worker for ever: a stop right after the first answer hung until the
        SIGKILL in 2 of 4 tries. The second SIGTERM finds the worker running, and all exit.
        """
        family = descendants(self.pid)
        for wait_s in (TERM_AGAIN_S, timeout_s):
            if self._popen.poll() is not None:
                break
            try:
                os.killpg(self.pid, signal.SIGTERM)  # started in a session of its own: its group
            except ProcessLookupError:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(wait_s)
        if self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()
        if not _wait_gone(family, timeout_s=5.0):  # children usually follow their parent out
            _signal_all(family, signal.SIGTERM)
            if not _wait_gone(family, timeout_s):
                _signal_all(family, signal.SIGKILL)
                _wait_gone(family, timeout_s=5.0)


def failure(what: str, processes: Sequence[Process]) -> PeerStartError:
    """An error naming every log and quoting the end of each."""
    parts = [what]
    for process in processes:
        code = process.exited()
        state = "running" if code is None else f"exited with {code}"
        parts.append(f"--- {process.name} ({state}), log {process.log_path}:\n{process.tail()}")
    return PeerStartError("\n".join(parts))


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (a peer started there would never be reached)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, processes: Sequence[Process]) -> None:
    """Poll ``condition`` until it holds; fail fast, quoting the logs, if one of ``processes`` dies."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [p for p in processes if p.exited() is not None]
        if dead:
            raise failure(f"{dead[0].name} exited while waiting for {what}", processes)
        if time.monotonic() > deadline:
            raise failure(f"timed out after {timeout_s:.0f} s waiting for {what}", processes)
        time.sleep(POLL_S)


def answers(url: str, body: bytes) -> bool:
    """Whether a POST of ``body`` to ``url`` gets HTTP 200 and a JSON object with an output."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200 and "output" in json.loads(response.read())
    except (OSError, ValueError):  # refused, reset, HTTP errors (URLError is an OSError), bad JSON
        return False
