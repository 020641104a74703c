"""Each benchmark peer starts, answers as ringserve's numpy engine does, and leaves no process.

mosec and ray skip unless ``bench/requirements-peers.txt`` is installed (CI does not).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from bench.peers import running_peer, unavailable
from bench.peers.process import alive, descendants, free_port
from tasks.repository import Repository
from tests.conftest import ROOT

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
    "name",
    [
        pytest.param("naive", marks=pytest.mark.timeout(60)),
        pytest.param("mosec", marks=pytest.mark.timeout(60)),
        pytest.param("ray", marks=pytest.mark.timeout(180)),  # a cold Ray cluster start
    ],
)
def test_peer_answers_like_the_engine_and_stops(name: str) -> None:
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    before = descendants(os.getpid())
    with running_peer(name, "digits", workers=1, port=free_port()) as url:
        started = {pid: start for pid, start in descendants(os.getpid()).items() if pid not in before}
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
