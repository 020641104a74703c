"""A real ringserve for one measurement: started by ./docker-free-run.sh on free ports, always stopped.

The system runs in its own session (so a Ctrl-C at the terminal reaches the benchmark, which
then stops the system, rather than reaching the workers first) with its own run directory,
where supervisord keeps its socket, the secrets and the logs. Processes are named as
supervisord knows them (``redis``, ``worker_1``, ``gateway``, ``flower``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from bench import auth, cgroup, procs
from tasks.metadata import load_repository
from tasks.settings import Settings, redact

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docker-free-run.sh"
SUPERVISORCTL = ROOT / ".venv" / "bin" / "supervisorctl"
HOST = "127.0.0.1"
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 120
LOG_TAIL_LINES = 40
REDIS_START_TIMEOUT_S = 20.0
REDIS_POLL_S = 0.01
READY_POLL_S = 0.1
TABLES_TIMEOUT_S = 180.0  # a fresh clone generates the ranker's table on first use, then each worker loads its rows
PREFIX = "RINGSERVE_"
# Set by the harness for every system it starts; the caller's other RINGSERVE_* settings pass through.
HARNESS_OWNED = frozenset(
    {"REDIS_URL", "REDIS_PASSWORD_FILE", "RUN_DIR", "PORT", "FLOWER_PORT", "REDIS_PORT", "WORKERS"}
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class StartError(RuntimeError):
    """The system did not start; the message holds the run script's output and the logs' tails."""


def supervisorctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """supervisorctl against the supervisord of ``run_dir`` (through its socket, never a pid file)."""
    return subprocess.run(
        [str(SUPERVISORCTL), "-c", str(run_dir / "supervisord.conf"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def supervised_pids(run_dir: Path) -> dict[str, int]:
    """Process name -> pid of every running process of ``run_dir``'s supervisord (none if it is not running)."""
    if not (run_dir / "supervisord.conf").exists():
        return {}
    pids = {}
    for line in supervisorctl(run_dir, "status").stdout.splitlines():
        fields = line.replace(",", " ").split()  # "worker_1  RUNNING  pid 123, uptime 0:00:05"
        if len(fields) >= 4 and fields[1] == "RUNNING" and fields[2] == "pid":
            pids[fields[0]] = int(fields[3])
    return pids


class RingServe:
    """``with RingServe(run_dir, workers=3, settings={"MAX_BATCH_SIZE": "1"}) as system: system.url``.

    ``settings`` are ``RINGSERVE_*`` variables without the prefix, handed to every process, on top
    of those in this process's environment (except the ones the harness sets: ports, run dir, Redis).
    ``env`` adds other variables for every process (``compare`` pins BLAS threads in every system).
    """

    def __init__(
        self,
        run_dir: Path,
        workers: int = 3,
        settings: dict[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if any(k.startswith(PREFIX) for k in env or {}):
            raise ValueError(f"{PREFIX}* variables are settings: pass them as settings")
        self.run_dir = run_dir.resolve()  # every process, and supervisord's config, name it absolutely
        self.workers = workers
        inherited = {k.removeprefix(PREFIX): v for k, v in os.environ.items() if k.startswith(PREFIX)}
        # The loads repeat 256 input rows: with the response cache on, every scenario would measure it. Off unless
        # the environment or the scenario (``cache``) says otherwise.
        self.settings = {"CACHE": "off"} | {k: v for k, v in inherited.items() if k not in HARNESS_OWNED}
        self.settings |= dict(settings or {})
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)} | dict(env or {})
        self.env.update({PREFIX + k: str(v) for k, v in self.settings.items()})
        self.env.update(
            {
                "RINGSERVE_RUN_DIR": str(self.run_dir),
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
        """What results record of this system: its settings, secrets redacted."""
        shown = {k: redact(k, v) for k, v in self.settings.items()}
        return {"system": "ringserve", "workers": self.workers, "settings": shown}

    def launch(self, command: str, settings: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``./docker-free-run.sh COMMAND`` in the background with ``settings`` (without the prefix) on top of the
        system's, for a command the caller may not wait out (an add-worker whose worker never joins): end it
        with :func:`halt`."""
        env = self.env | {PREFIX + k: str(v) for k, v in (settings or {}).items()}
        return subprocess.Popen(
            [str(SCRIPT), command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

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
        shown = self.config()["settings"] or "default settings"
        print(f"starting ringserve ({self.workers} workers, {shown}) in {self.run_dir}", file=sys.stderr)
        try:
            started = self._script("start", START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        if started.returncode != 0:
            self.stop()
            raise StartError(f"ringserve did not start:\n{started.stdout}{started.stderr}\n{self.log_tails()}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop everything the system's supervisord started, and supervisord; safe to call twice.

        A measured system is thrown away: its generated passwords go with it, so that nothing
        under the results directory holds a secret."""
        stopped = self._script("stop", STOP_TIMEOUT_S)
        if stopped.returncode != 0:
            print(f"stopping ringserve failed: {stopped.stderr}", file=sys.stderr)
            return
        shutil.rmtree(self.run_dir / "secrets", ignore_errors=True)
        (self.run_dir / "redis" / "redis.conf").unlink(missing_ok=True)

    @property
    def redis_url(self) -> str:
        """The Redis the system uses, password included (the run script records where in ``<run dir>/env``)."""
        recorded = {}
        env_file = self.run_dir / "env"
        if env_file.exists():
            for line in env_file.read_text().splitlines():
                name, _, value = line.removeprefix("export ").partition("=")
                recorded[name] = value.strip("'")
        return Settings.from_env({**self.env, **recorded}).redis_url

    def pids(self) -> dict[str, int]:
        """Process name -> pid of what runs now (a restarted process has a new pid)."""
        return supervised_pids(self.run_dir)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` to a process (SIGKILL: a crash, which supervisord answers with a restart); returns its pid."""
        pid = self.pids()[name]
        os.kill(pid, sig)
        return pid

    def control(self, action: str, name: str) -> None:
        """``supervisorctl start|stop NAME``: stop is graceful (TERM) and final until started again."""
        done = supervisorctl(self.run_dir, action, name)
        if done.returncode != 0:
            raise StartError(f"supervisorctl {action} {name} failed: {done.stdout}{done.stderr}")

    def start_redis(self) -> None:
        """Start the system's Redis again (after a crash with RINGSERVE_REDIS_AUTORESTART=false), returning
        once it answers PING: empty, as a new server with a new ``run_id``."""
        self.control("start", "redis")
        client = Redis.from_url(self.redis_url, socket_timeout=1.0)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while True:
                try:
                    client.ping()
                    return
                except RedisError:
                    if time.monotonic() > deadline:
                        raise StartError(f"Redis did not restart:\n{self.log_tails()}") from None
                    time.sleep(REDIS_POLL_S)
        finally:
            client.close()

    def add_worker(self) -> str:
        """``./docker-free-run.sh add-worker``: one more worker, returned once it has joined the ring."""
        done = self._script("add-worker", START_TIMEOUT_S)
        if done.returncode != 0:
            raise StartError(f"add-worker failed:\n{done.stdout}{done.stderr}\n{self.log_tails()}")
        # It says "worker_4 joined: ..." (supervisord still calls it STARTING for its first seconds).
        joined = [line.split()[0] for line in done.stdout.splitlines() if " joined: " in line]
        return joined[-1] if joined else ""

    def processes(self) -> dict[int, int]:
        """pid -> start time of every live process started for this system: they all carry its run
        directory in their environment, also the gateway's forks (a respawn shows as a new pair)."""
        return procs.with_environment("RINGSERVE_RUN_DIR", str(self.run_dir))

    def memory_cgroups(self) -> dict[str, Path]:
        """Worker -> its memory cgroup, for workers started with ``RINGSERVE_WORKER_MEMORY_LIMIT``."""
        return cgroup.recorded(self.run_dir)

    def wait_ready(self, path: str, timeout_s: float, give_up: Callable[[], str | None] = lambda: None) -> float:
        """Seconds until ``GET path`` answered 200 (e.g. ``/v2/models/ranker/ready`` once every worker holds
        the rows it owns); StartError, with the logs' tails, after ``timeout_s`` or as soon as ``give_up()``
        says why waiting is pointless."""
        start = time.monotonic()
        while True:
            try:
                with auth.get(self.url + path, timeout_s=READY_POLL_S * 10) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except OSError:  # an answer other than 200 (HTTPError), or none
                pass
            why = give_up() or (f"not within {timeout_s:g} s" if time.monotonic() - start > timeout_s else None)
            if why is not None:
                raise StartError(f"GET {path} did not answer 200: {why}\n{self.log_tails()}")
            time.sleep(READY_POLL_S)

    def wait_tables(self, timeout_s: float = TABLES_TIMEOUT_S) -> None:
        """Until every sharded model is ready: each worker loads the rows it owns in the background
        after it starts (seconds of CPU for the ranker's table), and a measurement taken meanwhile
        would count that load as the cost of the requests it serves."""
        repository = Path(Settings.from_env(self.env).model_repository)
        for meta in load_repository(repository if repository.is_absolute() else ROOT / repository).values():
            if meta.sharding is not None:
                self.wait_ready(f"/v2/models/{meta.name}/ready", timeout_s)

    def stats(self) -> dict[str, Any]:
        with auth.get(f"{self.url}/stats", timeout_s=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def log_tails(self) -> str:
        tails = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            tails.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(tails)


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """What the gateway's counters (/stats) added during a run: requests per node, batch sizes, errors,
    requests bounded loads sent past their owner (per worker they went to)."""
    delta = {}
    for name in ("requests_per_node", "batch_size_histogram", "errors_by_status", "spilled_per_node"):
        old, new = before.get(name, {}), after.get(name, {})
        delta[name] = {k: int(v) - int(old.get(k, 0)) for k, v in new.items() if int(v) - int(old.get(k, 0))}
    return delta


def halt(script: subprocess.Popen[bytes]) -> None:
    """End a command of :meth:`RingServe.launch` and what it started in its session (its waits, not the system)."""
    if script.poll() is None:
        os.killpg(script.pid, signal.SIGTERM)
    script.wait()
