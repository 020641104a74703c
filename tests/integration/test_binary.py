"""The Open Inference Protocol's binary tensor data extension, as standard clients speak it.

``tritonclient[http]`` (from PyPI, binary by default) against a real HTTP server in front of the
real gateway and workers, in all four combinations of binary and JSON inputs and outputs; then
every rule of the extension over raw HTTP, hostile sizes and headers included.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from tasks.repository import Repository
from tasks.settings import Settings
from tests.conftest import ROOT, Cluster

HEADER = "Inference-Header-Content-Length"
URL = "/v2/models/digits/infer"
ROWS = np.random.default_rng(7).uniform(0, 16, size=(3, 64)).astype(np.float32)


def expected(rows: np.ndarray) -> np.ndarray:
    """What the engine computes in-process for ``rows``."""
    model = Repository(str(ROOT / "models")).get("digits")
    return np.asarray(model.forward({"pixels": rows})["probabilities"])


@pytest.fixture
def server(shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]) -> Iterator[str]:
    """The gateway behind a real HTTP server (werkzeug's, threaded) on a free port."""
    http = make_server("127.0.0.1", 0, app_factory(shared_cluster.settings), threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{http.server_port}"
    http.shutdown()
    thread.join()


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_tritonclient_with_binary_and_json(server: str, binary_in: bool, binary_out: bool) -> None:
    client = triton.InferenceServerClient(server)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        assert client.get_model_metadata("digits")["inputs"][0]["name"] == "pixels"
        given = triton.InferInput("pixels", list(ROWS.shape), "FP32")
        given.set_data_from_numpy(ROWS, binary_data=binary_in)
        asked = triton.InferRequestedOutput("probabilities", binary_data=binary_out)
        result = client.infer("digits", [given], outputs=[asked])
        out = result.as_numpy("probabilities")
    finally:
        client.close()
    assert out.shape == (3, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected(ROWS), atol=1e-6)


def test_tritonclient_defaults(server: str) -> None:
    """No options at all: tritonclient sends binary inputs and asks for binary outputs."""
    client = triton.InferenceServerClient(server)
    try:
        given = triton.InferInput("pixels", [1, 64], "FP32")
        given.set_data_from_numpy(ROWS[:1])
        out = client.infer("digits", [given]).as_numpy("probabilities")
    finally:
        client.close()
    np.testing.assert_allclose(out, expected(ROWS[:1]), atol=1e-6)


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {HEADER: str(len(head))}


def pixels(rows: int, size: int | None = None, **extra: object) -> dict:
    n = rows * 64 * 4 if size is None else size
    return {"name": "pixels", "datatype": "FP32", "shape": [rows, 64], "parameters": {"binary_data_size": n}, **extra}


def split_response(body: bytes, header_length: str) -> tuple[dict, bytes]:
    n = int(header_length)
    return json.loads(body[:n]), body[n:]


def test_binary_outputs_follow_the_json_in_order(client: FlaskClient) -> None:
    data, headers = binary_body(
        {"inputs": [pixels(2)], "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]},
        ROWS[:2].tobytes(),
    )
    response = client.post(URL, data=data, headers=headers)
    assert response.status_code == 200, response.data[:300]
    head, blob = split_response(response.data, response.headers[HEADER])
    (output,) = head["outputs"]
    assert output["parameters"] == {"binary_data_size": 2 * 10 * 4} and "data" not in output
    np.testing.assert_allclose(np.frombuffer(blob, "<f4").reshape(2, 10), expected(ROWS[:2]), atol=1e-6)


def test_binary_data_output_asks_for_every_output(client: FlaskClient) -> None:
    data, headers = binary_body({"inputs": [pixels(1)], "parameters": {"binary_data_output": True}}, ROWS[0].tobytes())
    response = client.post(URL, data=data, headers=headers)
    head, blob = split_response(response.data, response.headers[HEADER])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == len(blob) == 40


def test_json_outputs_stay_json(client: FlaskClient) -> None:
    data, headers = binary_body({"inputs": [pixels(1)]}, ROWS[0].tobytes())
    response = client.post(URL, data=data, headers=headers)
    assert response.status_code == 200 and HEADER not in response.headers
    np.testing.assert_allclose(response.json["outputs"][0]["data"], expected(ROWS[:1]).ravel(), atol=1e-6)


def test_the_raw_single_input_form(client: FlaskClient) -> None:
    response = client.post(URL, data=ROWS.tobytes(), headers={HEADER: "0"})
    assert response.status_code == 200, response.data[:300]
    head, blob = split_response(response.data, response.headers[HEADER])
    assert head["outputs"][0]["shape"] == [3, 10]
    np.testing.assert_allclose(np.frombuffer(blob, "<f4").reshape(3, 10), expected(ROWS), atol=1e-6)


@pytest.mark.parametrize(
    ("header", "blobs", "words"),
    [
        ({"inputs": [pixels(1, size=255)]}, [b"\0" * 255], "takes 256 bytes, got 255"),
        ({"inputs": [pixels(1, size=257)]}, [b"\0" * 257], "takes 256 bytes, got 257"),
        ({"inputs": [pixels(1)]}, [b"\0" * 100], "only 100 bytes of binary data are left"),
        ({"inputs": [pixels(1)]}, [b"\0" * 300], "44 bytes of binary data after the last binary input"),
        ({"inputs": [pixels(1, size=-1)]}, [], "binary_data_size must be a non-negative integer"),
        ({"inputs": [pixels(1, size=True)]}, [b"\0"], "binary_data_size must be a non-negative integer"),
        ({"inputs": [pixels(1, size=2**70)]}, [], "binary_data_size"),
        ({"inputs": [pixels(1, data=[0.0] * 64)]}, [b"\0" * 256], "both data and binary_data_size"),
        ({"inputs": [pixels(2)]}, [b"\0" * 256], "only 256 bytes"),
        (
            {"inputs": [pixels(1)], "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]},
            [b"\0" * 256],
            "binary_data must be a boolean",
        ),
        ({"inputs": [pixels(1)], "parameters": {"binary_data_output": 1}}, [b"\0" * 256], "must be a boolean"),
    ],
)
def test_bad_binary_requests_get_400(client: FlaskClient, header: dict, blobs: list[bytes], words: str) -> None:
    data, headers = binary_body(header, *blobs)
    response = client.post(URL, data=data, headers=headers)
    assert response.status_code == 400 and words in response.json["error"], response.json


@pytest.mark.parametrize(
    ("body", "length", "words"),
    [
        (b'{"inputs": []}', "-1", "must be a non-negative integer"),
        (b'{"inputs": []}', "1e3", "must be a non-negative integer"),
        (b'{"inputs": []}', "\u0663", "must be a non-negative integer"),  # an Arabic-Indic 3: isdigit, not ASCII
        (b'{"inputs": []}', "99", "but the body has only 14 bytes"),
        (b'{"inputs": [', "12", "malformed JSON"),
        (b"\xff\xfe" + b"\0" * 10, "2", "malformed JSON"),
        (b"[1, 2]", "6", "must be a JSON object"),
        (b"\0" * 100, "0", "whole rows of 256 bytes, got 100"),
        (b"", "0", "whole rows of 256 bytes, got 0"),
        (b"\0" * 256 * 33, "0", "more than model 'digits' takes"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "parameters": '
         b'{"binary_data_size": 256}}]}', None, "only 0 bytes of binary data are left"),  # fmt: skip
    ],
)
def test_hostile_headers_and_sizes_get_400(client: FlaskClient, body: bytes, length: str | None, words: str) -> None:
    headers = {} if length is None else {HEADER: length}
    response = client.post(URL, data=body, headers=headers)
    assert response.status_code == 400 and words in response.json["error"], response.json


def test_bool_data_must_be_zeros_and_ones() -> None:
    from app.errors import BadRequest
    from app.schemas import binary_tensor
    from tasks.metadata import TensorSpec

    spec = TensorSpec("flags", "BOOL", (-1, 3))
    assert binary_tensor(spec, (1, 3), b"\x01\x00\x01").data == b"\x01\x00\x01"
    with pytest.raises(BadRequest, match="BOOL data must be bytes 0 or 1"):
        binary_tensor(spec, (1, 3), b"\x01\x02\x00")
