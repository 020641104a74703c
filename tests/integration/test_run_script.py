"""README's first command, for real: ./docker-free-run.sh starts everything and stops it all."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, free_port, wait_until


def get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    """Running: a zombie (exited, its exit status not yet collected by its parent) is not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_start_serve_stop(tmp_path: Path) -> None:
    port, flower_port = free_port(), free_port()
    env = {
        **os.environ,
        "RINGSERVE_RUN_DIR": str(tmp_path / "run"),
        "RINGSERVE_PORT": str(port),
        "RINGSERVE_FLOWER_PORT": str(flower_port),
        "RINGSERVE_REDIS_PORT": str(free_port()),
        "RINGSERVE_WORKERS": "2",
    }
    env.pop("RINGSERVE_REDIS_URL", None)
    script = str(ROOT / "docker-free-run.sh")
    try:
        started = subprocess.run([script], env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stderr + started.stdout
        assert "ringserve is up: workers worker_1 worker_2" in started.stdout
        assert get(f"http://127.0.0.1:{port}/v2/health/ready") == {"ready": True}
        answer = get(f"http://127.0.0.1:{port}/infer", {"model": "digits", "key": "u1", "input": [1.0] * 64})
        assert len(answer["output"]) == 10 and answer["node"] in ("worker_1", "worker_2")

        def flower_lists_both() -> bool:  # Flower learns of workers from their heartbeats (2 s)
            workers = get(f"http://127.0.0.1:{flower_port}/workers?json=1")["data"]
            return {w["hostname"].split("@")[0] for w in workers} == {"worker_1", "worker_2"}

        wait_until(flower_lists_both, 15, "Flower to list both workers")
        pids = [int(p.read_text()) for p in (tmp_path / "run" / "pids").glob("*.pid")]
        assert len(pids) == 5  # redis, 2 workers, gateway, flower
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(pid) for pid in pids)
    assert not list((tmp_path / "run" / "pids").glob("*.pid"))
