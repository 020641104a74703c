"""The whole request path with real parts: gateway → ring → Celery queue → batch consumer → Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from hashing.ring import Ring
from tasks.repository import Repository
from tasks.settings import Settings
from tests.conftest import ROOT, Cluster

REPOSITORY = Repository(ROOT / "models")
HELDOUT = np.load(Path(ROOT / "models/digits/1/heldout.npz"))


def expected_digits(rows: np.ndarray) -> np.ndarray:
    return REPOSITORY.get("digits", "1").forward({"pixels": rows.astype(np.float32)})["probabilities"]


def test_simple_api_round_trip(client: FlaskClient, shared_cluster: Cluster) -> None:
    row = HELDOUT["X"][0]
    response = client.post("/infer", json={"model": "digits", "key": "u1", "input": row.tolist()})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["model"] == "digits" and body["version"] == "1" and body["cached"] is False
    assert body["node"] in shared_cluster.workers
    assert body["batch_size"] >= 1 and body["latency_ms"] > 0
    assert len(body["output"]) == 10
    np.testing.assert_allclose(body["output"], expected_digits(row[None])[0], rtol=1e-6)
    assert int(np.argmax(body["output"])) == int(HELDOUT["y"][0])


def test_simple_api_many_rows_and_default_model(client: FlaskClient) -> None:
    rows = HELDOUT["X"][:5]
    response = client.post("/infer", json={"input": rows.tolist()})
    assert response.status_code == 200, response.json
    assert response.json["model"] == "digits"
    np.testing.assert_allclose(response.json["output"], expected_digits(rows), rtol=1e-6)


def test_v2_metadata_and_health(client: FlaskClient) -> None:
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json["name"] == "ringserve"
    meta = client.get("/v2/models/digits").json
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"][0]["name"] == "probabilities"
    assert client.get("/v2/models/digits/versions/1").status_code == 200
    assert client.get("/v2/models/digits/ready").json == {"name": "digits", "version": "1", "ready": True}
    assert client.get("/v2/models/heavy/versions/1/ready").status_code == 200


@pytest.mark.parametrize("nested", [True, False])
def test_v2_infer_json_tensors(client: FlaskClient, nested: bool) -> None:
    rows = HELDOUT["X"][:3]
    data = rows.tolist() if nested else rows.ravel().tolist()
    response = client.post(
        "/v2/models/digits/versions/1/infer",
        json={"id": "req-7", "inputs": [{"name": "pixels", "shape": [3, 64], "datatype": "FP32", "data": data}]},
    )
    assert response.status_code == 200, response.json
    body = response.json
    assert body["id"] == "req-7" and body["model_name"] == "digits" and body["model_version"] == "1"
    [out] = body["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [3, 10]
    np.testing.assert_allclose(np.reshape(out["data"], (3, 10)), expected_digits(rows), rtol=1e-6)
    assert body["parameters"]["node"] and body["parameters"]["batch_size"] >= 3


def test_heavy_model_round_trip(client: FlaskClient) -> None:
    rows = np.random.default_rng(0).normal(size=(2, 1024)).astype(np.float32)
    response = client.post("/infer", json={"model": "heavy", "input": rows.tolist()})
    assert response.status_code == 200, response.json
    expected = REPOSITORY.get("heavy", "1").forward({"features": rows})["probabilities"]
    np.testing.assert_allclose(response.json["output"], expected, rtol=1e-4, atol=1e-7)


def test_same_key_always_lands_on_the_same_node(client: FlaskClient, shared_cluster: Cluster) -> None:
    ring = Ring(shared_cluster.settings.vnodes)
    for node, member in shared_cluster.membership.alive().items():
        ring.add(node, member.weight)
    row = HELDOUT["X"][1].tolist()
    for key in [f"user-{i}" for i in range(12)]:
        nodes = {client.post("/infer", json={"key": key, "input": row}).json["node"] for _ in range(4)}
        assert nodes == {ring.lookup(key)}, key
    header_nodes = {
        client.post("/infer", json={"input": row}, headers={"X-Routing-Key": "user-3"}).json["node"] for _ in range(3)
    }
    assert header_nodes == {ring.lookup("user-3")}


def test_keys_spread_over_both_workers(client: FlaskClient, shared_cluster: Cluster) -> None:
    row = HELDOUT["X"][2].tolist()
    nodes = {client.post("/infer", json={"key": f"k{i}", "input": row}).json["node"] for i in range(40)}
    assert nodes == set(shared_cluster.workers)


def test_concurrent_requests_are_batched(shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]) -> None:
    app = app_factory(shared_cluster.settings)
    app.test_client().get("/v2/health/ready")  # start the gateway's threads first
    histogram_before = app.test_client().get("/stats").json["batch_size_histogram"]
    rows = HELDOUT["X"][:64]
    results: list[dict] = [{}] * 64
    start = threading.Barrier(64)

    def call(i: int) -> None:
        client = app.test_client()
        start.wait()
        response = client.post("/infer", json={"key": f"user-{i}", "input": rows[i].tolist()})
        results[i] = {"status": response.status_code, **(response.json or {})}

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["status"] for r in results] == [200] * 64
    for i, r in enumerate(results):  # every request got its own row's answer
        np.testing.assert_allclose(r["output"], expected_digits(rows[i : i + 1])[0], rtol=1e-4, atol=1e-9)
    assert max(r["batch_size"] for r in results) > 1
    stats = app.test_client().get("/stats").json
    # The shared database holds earlier tests' batches too: look only at what these 64 added.
    added = {s: n - histogram_before.get(s, 0) for s, n in stats["batch_size_histogram"].items()}
    assert sum(int(size) * n for size, n in added.items()) == 64 * 1  # every row counted once
    assert any(int(size) > 1 and n > 0 for size, n in added.items())
    assert set(stats["members"]) == set(shared_cluster.workers)


def test_keys_keep_their_node_under_concurrent_load(
    shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]
) -> None:
    """The same keys routed twice by 16 concurrent clients: at least 99 % meet the same node."""
    app = app_factory(shared_cluster.settings)
    app.test_client().get("/v2/health/ready")
    row = HELDOUT["X"][3].tolist()
    keys = [f"affinity-{i}" for i in range(400)]

    def route_all() -> dict[str, str]:
        nodes: dict[str, str] = {}

        def call(chunk: list[str]) -> None:
            client = app.test_client()
            for key in chunk:
                nodes[key] = client.post("/infer", json={"key": key, "input": row}).json["node"]

        threads = [threading.Thread(target=call, args=(keys[i::16],)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return nodes

    first, second = route_all(), route_all()
    same = sum(first[k] == second[k] for k in keys) / len(keys)
    print(f"same node twice under 16 concurrent clients: {same:.1%}")
    assert same >= 0.99
