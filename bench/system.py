"""A real ringserve for one measurement: started by ./docker-free-run.sh on free ports, always stopped.

The system runs in its own session (so a Ctrl-C at the terminal reaches the benchmark, which
then stops the system, rather than reaching the workers first) with its own run directory,
and leaves its logs there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from bench import procs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docker-free-run.sh"
HOST = "127.0.0.1"
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 120
LOG_TAIL_LINES = 40
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
REAP_INTERVAL_S = 0.05
LEFTOVER_TIMEOUT_S = 5.0
REDIS_START_TIMEOUT_S = 20.0  # as the run script's start_redis
REDIS_POLL_S = 0.01
PREFIX = "RINGSERVE_"
# Set by the harness for every system it starts; the caller's other RINGSERVE_* settings pass through.
HARNESS_OWNED = frozenset({"REDIS_URL", "RUN_DIR", "PORT", "FLOWER_PORT", "REDIS_PORT", "WORKERS"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class StartError(RuntimeError):
    """The system did not start; the message holds the run script's output and the logs' tails."""


class Reaper:
    """Adopts the processes the run script daemonises, and reaps each one as soon as it exits.

    Why: the script's processes outlive it, so they are re-parented; by default to PID 1, which
    on some machines (this project's sandboxes) reaps exited processes only every ~2 s. The
    script's ``stop`` waits while ``kill -0`` still succeeds, which it does on a zombie, so every
    stopped process cost 2 s. As a child subreaper (Linux), this process becomes their parent
    instead, and a thread reaps exactly the pids it is given (never others: that would steal
    the exit status of subprocesses waited for elsewhere).
    """

    def __init__(self) -> None:
        self._pids: set[int] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-reaper", daemon=True)
        try:
            self.enabled = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            self.enabled = False

    def adopt(self, pids: list[int]) -> None:
        """Reap these pids from now on (they are ours once the script that started them has exited)."""
        if not self.enabled:
            return
        with self._lock:
            self._pids.update(pids)
        if not self._thread.is_alive() and not self._closed.is_set():
            self._thread.start()

    def close(self) -> None:
        """Reap what is left and stop adopting: later orphans (of any code in this process) go to PID 1 again."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
        self._reap()
        if self.enabled:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

    def _run(self) -> None:
        while not self._closed.wait(REAP_INTERVAL_S):
            self._reap()

    def _reap(self) -> None:
        with self._lock:
            pids = list(self._pids)
        for pid in pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not (or no longer) our child
                done = pid
            if done:
                with self._lock:
                    self._pids.discard(pid)


class RingServe:
    """``with RingServe(run_dir, workers=3, settings={"MAX_BATCH_SIZE": "1"}) as system: system.url``.

    ``settings`` are ``RINGSERVE_*`` variables without the prefix, handed to every process, on top
    of those in this process's environment (except the ones the harness sets: ports, run dir, Redis).
    """

    def __init__(self, run_dir: Path, workers: int = 3, settings: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.workers = workers
        inherited = {k.removeprefix(PREFIX): v for k, v in os.environ.items() if k.startswith(PREFIX)}
        self.settings = {k: v for k, v in inherited.items() if k not in HARNESS_OWNED} | dict(settings or {})
        self.port = free_port()
        self._reaper: Reaper | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        self.env.update({PREFIX + k: str(v) for k, v in self.settings.items()})
        self.env.update(
            {
                "RINGSERVE_RUN_DIR": str(run_dir),
                "RINGSERVE_PORT": str(self.port),
                "RINGSERVE_FLOWER_PORT": str(free_port()),
                "RINGSERVE_REDIS_PORT": str(free_port()),
                "RINGSERVE_WORKERS": str(workers),
            }
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def config(self) -> dict[str, Any]:
        return {"system": "ringserve", "workers": self.workers, "settings": self.settings}

    def _script(self, command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            start_new_session=True,
        )

    def __enter__(self) -> RingServe:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._reaper = Reaper()  # before the script runs, so that what it starts is re-parented to us
        print(
            f"starting ringserve ({self.workers} workers, {self.settings or 'default settings'}) in {self.run_dir}",
            file=sys.stderr,
        )
        try:
            started = self._script("start", START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self._reaper.adopt(list(self.pids().values()))
        if started.returncode != 0:
            self.stop()
            raise StartError(f"ringserve did not start:\n{started.stdout}{started.stderr}\n{self.log_tails()}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop exactly what the script started (it keeps the pids), and what those started; safe to call twice."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            # also when `start` was interrupted before adopting; recorded pids may have exited already
            reaper.adopt([*self.pids().values(), *self.processes()])
        try:
            stopped = self._script("stop", STOP_TIMEOUT_S)
            leftovers = self.processes()
            if reaper is not None:
                reaper.adopt(list(leftovers))
            stop_leftovers(leftovers)
        finally:
            if reaper is not None:
                reaper.close()
        if stopped.returncode != 0:
            print(f"stopping ringserve failed: {stopped.stderr}", file=sys.stderr)

    @property
    def redis_url(self) -> str:
        """The Redis the system uses (the run script picks it at start and records it in ``<run dir>/env``)."""
        recorded = self.run_dir / "env"
        if recorded.exists():
            for line in recorded.read_text().splitlines():
                if "RINGSERVE_REDIS_URL=" in line:
                    return line.split("RINGSERVE_REDIS_URL=", 1)[1].strip()
        return f"redis://{HOST}:{self.env['RINGSERVE_REDIS_PORT']}/0"

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` to a recorded process (e.g. SIGKILL to ``worker_2``: a crash); returns its pid."""
        pid = self.pids()[name]
        os.kill(pid, sig)
        return pid

    def restart_redis(self) -> int:
        """Start the system's Redis again after a crash (``kill("redis")``): the run script's ``start_redis``
        command (same binary lookup, port, directory and options; no persistence, so it comes back empty,
        as a new server with a new ``run_id``), logging to ``logs/redis.log`` and recorded in ``pids/redis.pid``
        so that ``stop`` stops it. Returns its pid once it answers PING."""
        binary = shutil.which("redis-server", path=self.env.get("PATH")) or str(ROOT / ".venv" / "bin" / "redis-server")
        (self.run_dir / "redis").mkdir(parents=True, exist_ok=True)
        log = (self.run_dir / "logs" / "redis.log").open("ab")
        with log:
            proc = subprocess.Popen(
                [
                    binary,
                    *("--bind", HOST, "--port", self.env["RINGSERVE_REDIS_PORT"], "--dir", str(self.run_dir / "redis")),
                    *("--save", "", "--appendonly", "no", "--maxclients", "10000"),
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.run_dir / "pids" / "redis.pid").write_text(f"{proc.pid}\n")
        if self._reaper is not None:
            self._reaper.adopt([proc.pid])
        client = Redis.from_url(self.redis_url, socket_timeout=1.0)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while True:
                try:
                    client.ping()
                    return proc.pid
                except RedisError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise StartError(f"Redis did not restart:\n{self.log_tails()}") from None
                    time.sleep(REDIS_POLL_S)
        finally:
            client.close()

    def start_worker(self, node_id: str) -> int:
        """Start worker ``node_id`` as the run script does (same command, environment, log and pid file),
        e.g. to restart a killed worker under its old id, which ``add-worker`` never reuses; ``stop`` stops it."""
        log = (self.run_dir / "logs" / f"{node_id}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                [
                    str(ROOT / ".venv" / "bin" / "python"),
                    "-m",
                    "tasks.worker",
                    "--node-id",
                    node_id,
                    "--loglevel",
                    "INFO",
                ],
                cwd=ROOT,
                env={**self.env, "RINGSERVE_REDIS_URL": self.redis_url},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.run_dir / "pids" / f"{node_id}.pid").write_text(f"{proc.pid}\n")
        if self._reaper is not None:
            self._reaper.adopt([proc.pid])
        return proc.pid

    def add_worker(self) -> str:
        """``./docker-free-run.sh add-worker``: one more worker, returned once it has joined the ring."""
        before = set(self.pids())
        done = self._script("add-worker", START_TIMEOUT_S)
        if self._reaper is not None:
            self._reaper.adopt(list(self.pids().values()))
        if done.returncode != 0:
            raise StartError(f"add-worker failed:\n{done.stdout}{done.stderr}\n{self.log_tails()}")
        added = sorted(set(self.pids()) - before)
        return added[0] if added else ""

    def processes(self) -> dict[int, int]:
        """pid -> start time of every live process started for this system: they all carry its run directory."""
        return procs.with_environment("RINGSERVE_RUN_DIR", str(self.run_dir))

    def pids(self) -> dict[str, int]:
        """Process name (gateway, worker_1, redis, flower…) -> pid, as the run script recorded them."""
        return {p.stem: int(p.read_text()) for p in sorted((self.run_dir / "pids").glob("*.pid"))}

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def log_tails(self) -> str:
        tails = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            tails.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(tails)


def stop_leftovers(tree: dict[int, int], timeout_s: float = LEFTOVER_TIMEOUT_S) -> None:
    """TERM, then KILL, the processes of ``tree`` (pid -> start time) that still run after the script's stop.

    The script stops the processes it recorded; their children normally go with them, but a
    gateway stopped while it is still forking its workers leaves those workers behind.
    """
    alive = [pid for pid, start in tree.items() if procs.running(pid, start)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            print(f"stopping leftover process {pid} with {sig.name}", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [pid for pid in alive if procs.running(pid, tree[pid])]
        if not alive:
            return


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """What the gateway's counters (/stats) added during a run: requests per node, batch sizes, errors,
    requests bounded loads sent past their owner (per worker they went to)."""
    delta = {}
    for name in ("requests_per_node", "batch_size_histogram", "errors_by_status", "spilled_per_node"):
        old, new = before.get(name, {}), after.get(name, {})
        delta[name] = {k: int(v) - int(old.get(k, 0)) for k, v in new.items() if int(v) - int(old.get(k, 0))}
    return delta
