"""Each benchmark peer starts, answers as ringserve's numpy engine does, and leaves no process;
the floor answers a constant.

mosec and ray skip unless ``bench/requirements-peers.txt`` is installed (CI does not).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.peers import FLOOR, running_peer, unavailable
from bench.peers.process import Process, alive, descendants, free_port
from tasks.repository import Repository
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.integration

ROWS = np.load(ROOT / "models/digits/1/heldout.npz")["X"][:3].astype(np.float32)


def expected(rows: np.ndarray) -> np.ndarray:
    return Repository(ROOT / "models").get("digits").forward({"pixels": rows})["probabilities"]


def post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        pytest.param("naive", {}, marks=pytest.mark.timeout(60)),
        pytest.param("mosec", {"max_wait_ms": "5"}, marks=pytest.mark.timeout(60)),
        pytest.param("ray", {}, marks=pytest.mark.timeout(180)),  # a cold Ray cluster start
    ],
)
def test_peer_answers_like_the_engine_and_stops(name: str, settings: dict[str, str]) -> None:
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    before = descendants(os.getpid())
    with running_peer(name, "digits", workers=1, port=free_port(), settings=settings) as peer:
        url = peer.url
        started = {pid: start for pid, start in descendants(os.getpid()).items() if pid not in before}
        assert set(peer.pids.values()) <= set(started)  # the roots CPU is metered from
        status, many = post(url, {"model": "digits", "key": "user-42", "input": ROWS.tolist()})
        assert status == 200, many
        np.testing.assert_allclose(many["output"], expected(ROWS), rtol=1e-6)
        assert many["batch_size"] >= len(ROWS)
        status, one = post(url, {"model": "digits", "key": "user-42", "input": ROWS[0].tolist()})
        assert status == 200, one
        assert np.allclose(one["output"], expected(ROWS[:1])[0])
        status, _ = post(url, {"model": "digits", "input": [[1.0, 2.0]]})
        assert 400 <= status < 500
    assert started, "running_peer started no process"
    assert [pid for pid, start in started.items() if alive(pid, start)] == []


@pytest.mark.timeout(60)
def test_floor_answers_a_constant_and_stops() -> None:
    reason = unavailable(FLOOR)
    if reason is not None:
        pytest.skip(reason)
    before = descendants(os.getpid())
    with running_peer(FLOOR, "digits", workers=1, port=free_port()) as peer:
        started = {pid: start for pid, start in descendants(os.getpid()).items() if pid not in before}
        assert list(peer.pids) == ["web"]
        replies = [post(peer.url, {"model": "digits", "key": f"user-{i}", "input": ROWS[i].tolist()}) for i in (0, 1)]
        assert replies[0] == replies[1] and replies[0][0] == 200 and "output" in replies[0][1]
        assert post(peer.url, [1, 2])[0] == 400
    assert [pid for pid, start in started.items() if alive(pid, start)] == []


def test_an_unknown_setting_fails_before_anything_starts() -> None:
    with (
        pytest.raises(ValueError, match="max_wait_ms"),
        running_peer("naive", "digits", 1, free_port(), {"max_wait_ms": "5"}),
    ):
        pass


# A server whose child ignores the first SIGTERM and obeys the second, as a granian worker that is still
# starting does; its parent waits for the child, as granian's main process does.
STUBBORN = """
import os, signal, subprocess, sys, time
if sys.argv[1:] == ["child"]:
    terms = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0) if terms else terms.append(1))
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
child = subprocess.Popen([sys.executable, __file__, "child"])
signal.signal(signal.SIGTERM, lambda *_: None)  # the parent stops when its child has
sys.exit(child.wait())
"""


def test_a_stop_gets_past_a_process_that_ignores_the_first_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    process = Process("stubborn", [sys.executable, str(script)], tmp_path, dict(os.environ), tmp_path)
    wait_until(lambda: len(descendants(process.pid)) == 1, 10, "the child to start")
    time.sleep(0.5)  # its handler is in place
    family = descendants(process.pid)
    process.stop()
    assert process.exited() == 0  # it exited by itself after the second SIGTERM: no SIGKILL was needed
    assert not [pid for pid, start in family.items() if alive(pid, start)]
