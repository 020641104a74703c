"""README's first command, for real: ./docker-free-run.sh starts everything under supervisord, which
brings back what crashes; `stop` stops exactly that; no secret shows in `ps` or in a log."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError

from bench import procs
from bench.system import RingServe, supervised_pids
from hashing.membership import Membership
from tasks.contract import ANNOUNCEMENTS
from tests.conftest import ROOT, free_port, kill_a_gateway_process, wait_until

API_KEY = "test-api-key-4f1d9c"
ROW = [1.0] * 64
BACK_WITHIN_S = 5.0


def get(url: str, body: dict | None = None, headers: dict[str, str] | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def command_lines() -> str:
    """Every process's command line, as `ps -eo args` shows them (read from /proc, without `ps` itself)."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return "\n".join(lines)


def secrets_of(run_dir: Path) -> list[str]:
    return [p.read_text().strip() for p in sorted((run_dir / "secrets").glob("*.password"))]


def test_start_serve_stop_and_no_secret_shows(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port, flower_port = free_port(), free_port()
    env = {
        **os.environ,
        "RINGSERVE_RUN_DIR": str(run_dir),
        "RINGSERVE_PORT": str(port),
        "RINGSERVE_FLOWER_PORT": str(flower_port),
        "RINGSERVE_REDIS_PORT": str(free_port()),
        "RINGSERVE_WORKERS": "2",
        "RINGSERVE_API_KEYS": API_KEY,
    }
    env.pop("RINGSERVE_REDIS_URL", None)
    script = str(ROOT / "docker-free-run.sh")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        started = subprocess.run([script], env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stderr + started.stdout
        assert "ringserve is up: workers worker_1 worker_2" in started.stdout
        assert get(f"http://127.0.0.1:{port}/v2/health/ready") == {"ready": True}
        answer = get(f"http://127.0.0.1:{port}/infer", {"model": "digits", "key": "u1", "input": ROW}, auth)
        assert len(answer["output"]) == 10 and answer["node"] in ("worker_1", "worker_2")

        redis_password, flower_password = (run_dir / "secrets" / f"{n}.password" for n in ("redis", "flower"))
        for secret in (redis_password, flower_password, run_dir / "redis" / "redis.conf", run_dir / "env"):
            assert secret.stat().st_mode & 0o777 == 0o600, secret
        password = redis_password.read_text().strip()
        assert len(password) >= 24
        with pytest.raises(AuthenticationError):
            Redis(port=int(env["RINGSERVE_REDIS_PORT"])).ping()
        memory = Redis(port=int(env["RINGSERVE_REDIS_PORT"]), password=password).config_get("maxmemory*")
        assert int(memory["maxmemory"]) > 0 and memory["maxmemory-policy"] == "noeviction"

        flower_auth = base64.b64encode(f"ringserve:{flower_password.read_text().strip()}".encode()).decode()

        def flower_lists_both() -> bool:  # Flower learns of workers from their heartbeats (2 s)
            url = f"http://127.0.0.1:{flower_port}/workers?json=1"
            workers = get(url, headers={"Authorization": f"Basic {flower_auth}"})["data"]
            return {w["hostname"].split("@")[0] for w in workers} == {"worker_1", "worker_2"}

        wait_until(flower_lists_both, 15, "Flower to list both workers")
        try:
            get(f"http://127.0.0.1:{flower_port}/workers?json=1")
            raise AssertionError("Flower answered without basic auth")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401

        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
        lines = {line.split()[0]: line for line in status.stdout.splitlines() if "RUNNING" in line}
        assert set(lines) == {"redis", "worker_1", "worker_2", "gateway", "flower"}, status.stdout
        assert all("uptime" in line and "(restarts: 0)" in line for line in lines.values()), status.stdout

        started_processes = procs.with_environment("RINGSERVE_RUN_DIR", str(run_dir))
        assert len(started_processes) >= 7  # supervisord, redis, 2 workers, granian + 2 forks, flower
        shown = command_lines()
        logs = "\n".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log"))
        for secret_value in [*secrets_of(run_dir), API_KEY]:
            assert secret_value not in shown, "a secret shows in ps"
            assert secret_value not in logs, "a secret shows in a log"
            assert secret_value not in started.stdout + started.stderr
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not procs.with_environment("RINGSERVE_RUN_DIR", str(run_dir))
    assert not (run_dir / "supervisor.sock").exists()

    # A pid recorded by the stopped run, now reused by an unrelated process: `stop` leaves it alone.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / "supervisord.pid").write_text(f"{bystander.pid}\n")
        again = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "nothing runs" in again.stderr
        time.sleep(0.2)
        assert bystander.poll() is None, "stop killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


class Load:
    """Clients posting /infer on keep-alive connections until stopped: HTTP statuses, and connections
    that broke mid-request (a connection belongs to one gateway process: only the killed one's break)."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.statuses: Counter[int] = Counter()
        self.broken = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def take(self) -> tuple[Counter[int], int]:
        with self._lock:
            taken = (self.statuses, self.broken)
            self.statuses, self.broken = Counter(), 0
        return taken

    def _client(self, n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        i = 0
        while not self._stop.is_set():
            body = json.dumps({"key": f"user-{n}-{i % 50}", "input": ROW})
            i += 1
            try:
                conn.request("POST", "/infer", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                with self._lock:
                    self.statuses[response.status] += 1
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.broken += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()


def back_after(condition: object, timeout_s: float = 30.0) -> float:
    """Seconds until ``condition()`` holds."""
    start = time.monotonic()
    wait_until(condition, timeout_s, "the process to be back")  # type: ignore[arg-type]
    return time.monotonic() - start


def test_crashed_processes_come_back_under_load(tmp_path: Path) -> None:
    with RingServe(tmp_path / "run", workers=2, settings={"GATEWAY_PROCESSES": "2"}) as system:
        redis = Redis.from_url(system.redis_url)
        membership = Membership(redis, 0, ANNOUNCEMENTS)
        with Load(system.port, clients=8) as load:
            time.sleep(1.0)
            assert sum(load.take()[0].values()) > 0

            # A worker: SIGKILL; supervisord restarts it under the same node id.
            old = membership.alive()["worker_1"]
            system.kill("worker_1")
            worker_back_s = back_after(lambda: membership.alive().get("worker_1", old) != old)
            time.sleep(2.0)
            statuses, broken = load.take()
            print(f"worker_1 back in the ring after {worker_back_s:.2f} s; answers {dict(statuses)}")
            assert worker_back_s <= BACK_WITHIN_S
            assert set(statuses) == {200} and broken == 0

            # One gateway process: granian respawns it; the other process's requests never fail.
            gateway = system.pids()["gateway"]
            gateway_back_s = back_after(kill_a_gateway_process(system))
            time.sleep(2.0)
            statuses, broken = load.take()
            print(f"gateway process respawned after {gateway_back_s:.2f} s; answers {dict(statuses)}, {broken} broken")
            assert gateway_back_s <= BACK_WITHIN_S
            assert set(statuses) == {200} and statuses[200] > 0
            assert broken <= 8  # at most one per client: those connected to the killed process

        # Flower: SIGKILL; supervisord restarts it.
        flower = system.kill("flower")
        flower_back_s = back_after(lambda: system.pids().get("flower", flower) != flower)
        print(f"flower back after {flower_back_s:.2f} s")
        assert flower_back_s <= BACK_WITHIN_S
        assert system.pids()["gateway"] == gateway  # granian itself never stopped
        redis.close()
    assert not supervised_pids(tmp_path / "run")


def test_a_relative_run_directory_is_made_absolute(tmp_path: Path) -> None:
    """supervisord resolves relative paths in its config against the config's own directory."""
    env = {**os.environ, "RINGSERVE_RUN_DIR": "some/run"}
    status = subprocess.run(
        [str(ROOT / "docker-free-run.sh"), "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert f"nothing runs under {tmp_path / 'some' / 'run'}" in status.stderr


def test_an_external_redis_password_is_never_written_or_shown(tmp_path: Path) -> None:
    """RINGSERVE_REDIS_URL with a password: the system uses it, but no file, banner or log holds it."""
    password, port = "external-redis-pw-5e8b", free_port()
    binary = os.environ.get("RINGSERVE_REDIS_SERVER") or "redis-server"
    redis_server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],  # fmt: skip
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "RINGSERVE_RUN_DIR": str(run_dir),
        "RINGSERVE_PORT": str(free_port()),
        "RINGSERVE_FLOWER_PORT": str(free_port()),
        "RINGSERVE_WORKERS": "1",
        "RINGSERVE_REDIS_URL": f"redis://:{password}@127.0.0.1:{port}/0",
    }
    script = str(ROOT / "docker-free-run.sh")
    try:
        wait_until(lambda: Redis(port=port).config_set("requirepass", password), 10, "the external Redis")
        started = subprocess.run([script], env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stderr + started.stdout
        assert "redis://:***@127.0.0.1" in started.stdout
        assert not (run_dir / "env").exists() and not (run_dir / "programs" / "redis.conf").exists()
        logs = "\n".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log"))
        assert password not in started.stdout + started.stderr + logs + command_lines()
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        redis_server.kill()
        redis_server.wait()


CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def memory_cgroup(pid: int) -> Path:
    """The cgroup v1 memory cgroup directory of a process."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_MEMORY / path.lstrip("/")
    raise AssertionError(f"process {pid} is in no memory cgroup")


def environment(pid: int) -> dict[str, str]:
    pairs = (item.decode().partition("=") for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if item)
    return {name: value for name, _, value in pairs}


@pytest.mark.skipif(
    not (CGROUP_MEMORY / "memory.limit_in_bytes").exists() or not os.access(CGROUP_MEMORY, os.W_OK),
    reason="needs cgroup v1's memory controller, writable (root)",
)
def test_worker_memory_limit_puts_each_worker_in_a_cgroup_of_its_own(tmp_path: Path) -> None:
    """RINGSERVE_WORKER_MEMORY_LIMIT: every worker (also one added later, which keeps start's limit) runs in
    its own memory cgroup with that limit; `stop` removes them. Settings reach the workers' environment."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(ROOT / "models" / "digits", models / "digits")  # a repository of digits alone
    limit = "300M"
    settings = {"WORKER_MEMORY_LIMIT": limit, "SHARDING": "off", "MODEL_REPOSITORY": str(models)}
    system = RingServe(tmp_path / "run", workers=1, settings=settings)
    with system:
        del system.env["RINGSERVE_WORKER_MEMORY_LIMIT"]  # add-worker keeps the limit start applied
        added = system.add_worker()
        assert added == "worker_2"
        # supervisord reports a pid once the program has run for its startsecs
        wait_until(lambda: "worker_2" in system.pids(), 60, "supervisord to call worker_2 running")
        cgroups = {}
        for name in ("worker_1", "worker_2"):
            pid = system.pids()[name]
            cgroup = cgroups[name] = memory_cgroup(pid)
            assert cgroup.name.startswith("ringserve-") and cgroup.name.endswith(f"-{name}"), cgroup
            assert int((cgroup / "memory.limit_in_bytes").read_text()) == 300 * 1024 * 1024
            assert str(pid) in (cgroup / "cgroup.procs").read_text().split()
            env = environment(pid)
            assert env["RINGSERVE_SHARDING"] == "off" and env["RINGSERVE_MODEL_REPOSITORY"] == str(models)
        assert cgroups["worker_1"] != cgroups["worker_2"]
        assert memory_cgroup(system.pids()["gateway"]) != cgroups["worker_1"]  # only workers are limited
        answer = get(f"{system.url}/infer", {"model": "digits", "key": "u1", "input": ROW})
        assert len(answer["output"]) == 10
        with pytest.raises(urllib.error.HTTPError, match="404"):
            get(f"{system.url}/v2/models/heavy")  # not in this repository: the setting reached the gateway too
    assert not any(cgroup.exists() for cgroup in cgroups.values())
    assert not (system.run_dir / "cgroups").exists()


def test_a_malformed_worker_memory_limit_starts_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "RINGSERVE_RUN_DIR": str(tmp_path / "run"), "RINGSERVE_WORKER_MEMORY_LIMIT": "800MB"}
    started = subprocess.run([str(ROOT / "docker-free-run.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    assert "RINGSERVE_WORKER_MEMORY_LIMIT=800MB: give bytes or a number with K, M or G" in started.stderr
    assert not (tmp_path / "run" / "supervisord.conf").exists()
