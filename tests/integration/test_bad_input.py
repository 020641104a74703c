"""Each class of bad input gets its 4xx JSON error, and the system keeps serving."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tasks.settings import Settings
from tests.conftest import Cluster

ROW = [0.0] * 64
V2 = "/v2/models/digits/infer"


def v2_input(**overrides: object) -> dict:
    tensor = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}
    tensor.update(overrides)
    return {"inputs": [tensor]}


BAD_REQUESTS = [
    # (case, path, body (dict = JSON, bytes = raw), status, words in the error)
    ("malformed JSON", "/infer", b'{"input": [1, 2', 400, "malformed JSON"),
    ("not an object", "/infer", b"[1, 2, 3]", 400, "JSON object"),
    ("missing input", "/infer", {"model": "digits"}, 400, "missing 'input'"),
    ("short row", "/infer", {"input": [1.0, 2.0]}, 400, "64"),
    ("ragged rows", "/infer", {"input": [ROW, ROW[:10]]}, 400, "shape"),
    ("string values", "/infer", {"input": ["a"] * 64}, 400, "does not take str"),
    ("bool values", "/infer", {"input": [True] * 64}, 400, "does not take bool"),
    ("null values", "/infer", {"input": [None] * 64}, 400, "NoneType"),
    ("out of FP32 range", "/infer", {"input": [1e39] * 64}, 400, "out of FP32 range"),
    ("too many rows", "/infer", {"input": [ROW] * 33}, 400, "33 rows"),
    ("empty input", "/infer", {"input": []}, 400, "non-empty"),
    ("unknown model", "/infer", {"model": "nope", "input": ROW}, 404, "unknown model"),
    ("unknown version", "/infer", {"model": "digits", "version": "9", "input": ROW}, 404, "no version"),
    ("v2 wrong datatype", V2, v2_input(datatype="INT32"), 400, "datatype must be FP32"),
    ("v2 wrong shape", V2, v2_input(shape=[1, 63]), 400, "does not match"),
    ("v2 data length", V2, v2_input(shape=[2, 64]), 400, "takes 128 elements"),
    ("v2 unknown input", V2, v2_input(name="image"), 400, "no input 'image'"),
    ("v2 no inputs", V2, {"inputs": []}, 400, "non-empty"),
    ("v2 shape not ints", V2, v2_input(shape=["1", 64]), 400, "list of integers"),
    ("v2 unknown output", V2, {**v2_input(), "outputs": [{"name": "logits"}]}, 400, "unknown outputs"),
    ("v2 unknown model", "/v2/models/nope/infer", v2_input(), 404, "unknown model"),
    ("v2 unknown version", "/v2/models/digits/versions/7/infer", v2_input(), 404, "no version"),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "words"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status(
    client: FlaskClient, case: str, path: str, body: object, status: int, words: str
) -> None:
    if isinstance(body, bytes):
        response = client.post(path, data=body, content_type="application/json")
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.json
    assert response.is_json and words in response.json["error"]


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    assert client.get("/nope").status_code == 404
    response = client.get("/infer")
    assert response.status_code == 405 and "error" in response.json


def test_system_keeps_serving_after_bad_input(client: FlaskClient, shared_cluster: Cluster) -> None:
    """Bad requests are refused at the edge, each counted under its status; good ones still pass.

    (No bad request reaches a worker: garbage that does is tests/integration/test_hostile_messages.py.)
    """
    before = client.get("/stats").json["errors_by_status"]
    for _, path, body, _, _ in BAD_REQUESTS:
        client.post(path, json=body) if not isinstance(body, bytes) else client.post(path, data=body)
    nodes = {client.post("/infer", json={"key": f"k{i}", "input": ROW}).json["node"] for i in range(20)}
    assert nodes == set(shared_cluster.workers)
    after = client.get("/stats").json["errors_by_status"]
    expected = Counter(str(status) for _, _, _, status, _ in BAD_REQUESTS)
    assert {s: after[s] - before.get(s, 0) for s in after if after[s] != before.get(s, 0)} == expected


def test_body_too_large_is_413(shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]) -> None:
    settings = Settings(**{**shared_cluster.settings.__dict__, "max_body_bytes": 1000})
    client = app_factory(settings).test_client()
    response = client.post("/infer", json={"input": [ROW] * 8})
    assert response.status_code == 413 and response.json == {"error": "request body too large"}


def test_api_keys_are_enforced_when_configured(
    shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]
) -> None:
    settings = Settings(**{**shared_cluster.settings.__dict__, "api_keys": ("s3cret",)})
    client = app_factory(settings).test_client()
    missing = client.post("/infer", json={"input": ROW})
    assert missing.status_code == 401 and "API key" in missing.json["error"]
    assert client.post("/infer", json={"input": ROW}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/infer", json={"input": ROW}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/infer", json={"input": ROW}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/v2/health/live").status_code == 200  # probes stay open


def test_no_worker_alive_is_503(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask]
) -> None:
    empty = cluster_factory()  # its own database: nobody announced there
    client = app_factory(empty.settings).test_client()
    response = client.post("/infer", json={"input": ROW})
    assert response.status_code == 503 and "no worker" in response.json["error"]
    assert response.headers["Retry-After"] == "1"
    assert client.get("/v2/health/ready").status_code == 503


def test_deadline_passed_is_504(shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]) -> None:
    settings = Settings(**{**shared_cluster.settings.__dict__, "request_timeout_ms": 1})
    client = app_factory(settings).test_client()
    response = client.post("/infer", json={"model": "heavy", "input": [[0.0] * 1024] * 32})
    assert response.status_code == 504 and "ms" in response.json["error"]
