"""Model versions with real workers: adding and removing one under load, the sticky split, per-version readiness.

Each test serves a copy of ``digits`` from its own repository under tmp_path, which it edits
the way an operator would: a new version's folder is moved into place whole, then config.json
is rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from hashing.split import choose_version
from tasks.settings import Settings
from tests.conftest import ROOT, ClosedLoop, Cluster, wait_until

ROW = [1.0] * 64
SHIPPED = ROOT / "models" / "digits"


class Repository:
    """A model repository holding ``digits`` version 1, edited as an operator would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = root / "digits"
        self.model.mkdir(parents=True)
        shutil.copytree(SHIPPED / "1", self.model / "1")
        self.config = json.loads((SHIPPED / "config.json").read_text())
        del self.config["default_version"]
        self.write(versions=["1"])

    def write(self, **changes: Any) -> None:
        """Rewrite config.json with ``changes`` (None removes a key), in one rename."""
        self.config.update(changes)
        config = {k: v for k, v in self.config.items() if v is not None}
        temporary = self.model / ".config.json.tmp"
        temporary.write_text(json.dumps(config))
        temporary.replace(self.model / "config.json")

    def add_version(self, version: str) -> None:
        """Version ``version``: version 1's weights, moved into place whole."""
        shutil.copytree(self.model / "1", self.model / f".{version}.tmp")
        (self.model / f".{version}.tmp").rename(self.model / version)

    def remove_version(self, version: str) -> None:
        shutil.rmtree(self.model / version)


class VersionLoad(ClosedLoop):
    """Closed-loop clients posting distinct keys that name no version; records (status, version answered)."""

    def send(self, client: FlaskClient, n: int, i: int) -> tuple[int, str | None]:
        response = client.post("/infer", json={"key": f"load-{n}-{i}", "input": ROW})
        return response.status_code, (response.json or {}).get("version")

    def versions(self) -> Counter[str | None]:
        return Counter(version for _, version in self.results)


def tensor() -> dict[str, Any]:
    return {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": ROW}


def versions_seen(client: FlaskClient) -> list[str]:
    return list(client.get("/v2/models/digits").json["versions"])


def status(client: FlaskClient, path: str) -> int:
    return client.get(path).status_code


@pytest.fixture
def repository(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "models")


def start(
    cluster_factory: Callable[..., Cluster], repository: Repository, workers: tuple[str, ...], **overrides: object
) -> Cluster:
    cluster = cluster_factory(model_repository=str(repository.root), **overrides)
    cluster.start(*workers)
    return cluster


def gateway(app_factory: Callable[[Settings], Flask], cluster: Cluster, poll_ms: int) -> tuple[Flask, FlaskClient]:
    """A gateway that rescans the repository every ``poll_ms``, once it sees every worker."""
    app = app_factory(dataclasses.replace(cluster.settings, repository_poll_ms=poll_ms))
    client = app.test_client()
    wait_until(lambda: status(client, "/v2/models/digits/ready") == 200, 10, "the gateway to be ready")
    return app, client


def test_adding_and_removing_a_version_under_load_fails_no_request(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], repository: Repository
) -> None:
    """Both orders of who sees a change first: a gateway that rescans before the workers (the worker loads
    the version on the first request for it) and one that rescans after them (the worker still answers
    the removed version during its grace period)."""
    cluster = start(cluster_factory, repository, ("w1", "w2"), repository_poll_ms=1000, version_grace_ms=4000)
    fast_app, fast = gateway(app_factory, cluster, poll_ms=50)
    slow_app, slow = gateway(app_factory, cluster, poll_ms=2500)
    clients = 2  # per gateway: each has at most one request in flight
    with VersionLoad(fast_app, clients) as fast_load, VersionLoad(slow_app, clients) as slow_load:
        fast_load.wait_for(50)
        slow_load.wait_for(50)

        repository.add_version("2")
        repository.write(versions=["1", "2"], traffic_split={"1": 50, "2": 50})
        for client, load in ((fast, fast_load), (slow, slow_load)):
            wait_until(lambda c=client: versions_seen(c) == ["1", "2"], 5, "the gateway to see version 2")
            wait_until(lambda ld=load: ld.versions()["2"] >= 20, 20, "version 2 to answer")
        wait_until(lambda: status(fast, "/v2/models/digits/versions/2/ready") == 200, 5, "version 2 ready")
        named = fast.post("/v2/models/digits/versions/2/infer", json={"inputs": [tensor()]})
        assert named.status_code == 200 and named.json["model_version"] == "2"

        repository.write(versions=["1"], traffic_split=None)
        repository.remove_version("2")
        for client in (fast, slow):
            wait_until(lambda c=client: versions_seen(c) == ["1"], 5, "the gateway to forget version 2")
        # A request each client had in flight may still have been split to version 2, and be answered after
        # this: every answer after those comes from version 1.
        after = (len(fast_load.results) + clients, len(slow_load.results) + clients)
        fast_load.wait_for(50)
        slow_load.wait_for(50)
        assert {v for _, v in fast_load.results[after[0] :]} == {"1"}
        assert {v for _, v in slow_load.results[after[1] :]} == {"1"}
    assert status(fast, "/v2/models/digits/versions/2/ready") == 404
    failed = fast_load.failed() + slow_load.failed()
    print(
        f"answers: fast gateway {dict(fast_load.versions())}, slow gateway {dict(slow_load.versions())};"
        f" failed: {len(failed)}"
    )
    assert failed == []
    logs = "".join(w.log() for w in cluster.workers.values())
    assert "model digits version 2: loaded" in logs
    wait_until(lambda: "dropped (retired" in "".join(w.log() for w in cluster.workers.values()), 10, "v2 dropped")


def test_the_split_is_sticky_per_routing_key_and_the_answer_names_its_version(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], repository: Repository
) -> None:
    repository.add_version("2")
    split = {"1": 70, "2": 30}
    repository.write(versions=["1", "2"], traffic_split=split)
    cluster = start(cluster_factory, repository, ("w1",))
    _, client = gateway(app_factory, cluster, poll_ms=50)
    _, other = gateway(app_factory, cluster, poll_ms=50)  # another gateway process agrees on every key

    answers: dict[str, set[str]] = {}
    for i in range(60):
        key = f"user-{i}"
        simple = client.post("/infer", json={"key": key, "input": ROW}).json["version"]
        v2 = other.post("/v2/models/digits/infer", json={"inputs": [tensor()], "parameters": {"routing_key": key}})
        header = client.post("/infer", json={"input": ROW}, headers={"X-Routing-Key": key}).json["version"]
        answers[key] = {simple, v2.json["model_version"], header}
    assert {k: v for k, v in answers.items() if v != {choose_version(k, split)}} == {}
    assert set.union(*answers.values()) == {"1", "2"}

    assert client.post("/infer", json={"key": "user-1", "version": 1, "input": ROW}).json["version"] == "1"
    assert client.post("/v2/models/digits/versions/2/infer", json={"inputs": [tensor()]}).json["model_version"] == "2"
    unknown = client.post("/infer", json={"key": "user-1", "version": "3", "input": ROW})
    assert unknown.status_code == 404 and "no version '3'" in unknown.json["error"]
    meta = client.get("/v2/models/digits").json
    assert meta["versions"] == ["1", "2"] and meta["traffic_split"] == {"1": 70.0, "2": 30.0}
    ready = client.get("/v2/models/digits/ready")
    assert ready.status_code == 200 and ready.json == {"name": "digits", "versions": ["1", "2"], "ready": True}

    repository.write(traffic_split={"1": 70, "4": 30})  # malformed: version 4 is not served
    wait_until(lambda: "reload refused" in cluster.workers["w1"].log(), 5, "the worker to refuse the reload")
    again = {k: client.post("/infer", json={"key": k, "input": ROW}).json["version"] for k in list(answers)[:20]}
    assert {k: v for k, v in again.items() if {v} != answers[k]} == {}  # the old split is still served
    assert client.get("/v2/models/digits").json["traffic_split"] == {"1": 70.0, "2": 30.0}


def test_a_version_is_ready_only_once_a_live_worker_serves_it(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], repository: Repository
) -> None:
    """Workers that never rescan on their own (poll 0) load a version when a request first names it."""
    cluster = start(cluster_factory, repository, ("w1",), repository_poll_ms=0)
    _, client = gateway(app_factory, cluster, poll_ms=50)
    assert status(client, "/v2/models/digits/versions/2/ready") == 404

    repository.add_version("2")
    repository.write(versions=["1", "2"])
    wait_until(lambda: versions_seen(client) == ["1", "2"], 5, "the gateway to see version 2")
    unready = client.get("/v2/models/digits/versions/2/ready")
    assert unready.status_code == 503 and "no live worker serves version 2" in unready.json["error"]
    assert status(client, "/v2/models/digits/ready") == 503  # unnamed requests now go to version 2, the latest
    assert status(client, "/v2/models/digits/versions/1/ready") == 200

    response = client.post("/infer", json={"version": "2", "input": ROW})
    assert response.status_code == 200 and response.json["version"] == "2"
    wait_until(lambda: status(client, "/v2/models/digits/versions/2/ready") == 200, 5, "version 2 to be reported")
    assert client.get("/v2/models/digits/ready").json == {"name": "digits", "version": "2", "ready": True}

    cluster.stop("w1")
    wait_until(lambda: status(client, "/v2/models/digits/versions/1/ready") == 503, 5, "no worker left")
