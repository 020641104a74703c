"""The load generator's pure parts: HTTP response parsing, key draws, request bodies, splitting a load."""

from __future__ import annotations

import orjson
import pytest

from bench.keys import KeySpace
from bench.loadgen import Load
from bench.payload import Bodies
from bench.transport import HttpError, parse_response
from tasks.metadata import load_repository
from tasks.settings import MODEL_REPOSITORY


def test_parse_response_with_content_length() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1"
    assert parse_response(raw) == (200, b"{}", len(raw) - len(b"HTTP/1.1"), False)
    assert parse_response(raw[:30]) is None
    assert parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}") is None


def test_parse_response_chunked_and_close() -> None:
    head = b"HTTP/1.1 503 Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    raw = head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert parse_response(raw) == (503, b"abcde", len(raw), True)
    assert parse_response(raw[:-2]) is None


def test_parse_response_rejects_garbage() -> None:
    with pytest.raises(HttpError):
        parse_response(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(HttpError):
        parse_response(b"HTTP/1.1 200 OK\r\n\r\n")  # neither a length nor chunks


def test_uniform_keys_cover_the_space() -> None:
    draws = KeySpace(10).sample(5000, seed=1)
    assert set(draws.tolist()) == set(range(10))
    assert (KeySpace(10).sample(50, seed=1) == KeySpace(10).sample(50, seed=1)).all()


def test_zipf_keys_are_skewed_towards_the_first() -> None:
    space = KeySpace(1000, zipf=1.1)
    p = space.probabilities()
    assert p.sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(2**1.1)
    draws = space.sample(20_000, seed=3)
    assert (draws == 0).mean() == pytest.approx(p[0], abs=0.01)
    with pytest.raises(ValueError):
        KeySpace(10, zipf=0)


@pytest.mark.parametrize("api", ["infer", "v2"])
def test_bodies_are_valid_requests(api: str) -> None:
    meta = load_repository(MODEL_REPOSITORY)["digits"]
    bodies = Bodies(meta, api, seed=0, pool=4)
    doc = orjson.loads(bodies.body("user-7", 7))
    if api == "infer":
        assert doc["model"] == "digits" and doc["key"] == "user-7" and len(doc["input"][0]) == 64
    else:
        assert doc["parameters"]["routing_key"] == "user-7"
        assert doc["inputs"][0]["shape"] == [1, 64] and len(doc["inputs"][0]["data"]) == 64
    assert bodies.body("user-7", 7) == bodies.body("user-7", 3)  # key 7 sends pool row 7 mod 4
    reply = b'{"output": [0.1], "node": "worker_2", "batch_size": 5, "cached": false}'
    if api == "v2":
        reply = b'{"outputs": [], "parameters": {"node": "worker_2", "batch_size": 5, "cached": false}}'
    parsed = bodies.parse(reply)
    assert (parsed.valid, parsed.node, parsed.batch_size, parsed.cached) == (True, "worker_2", 5, False)
    assert not bodies.parse(b'{"error": "x"}').valid
    assert not bodies.parse(b"not json").valid


def test_load_split_over_processes() -> None:
    load = Load("http://127.0.0.1:1", requests=1001, concurrent=5, processes=2)
    assert load.shares() == [(3, 601), (2, 400)]
    assert Load("http://x", requests=None, duration_s=2, concurrent=3, processes=3).shares() == [(1, None)] * 3
    with pytest.raises(ValueError):
        Load("http://x", requests=None, duration_s=None)
    with pytest.raises(ValueError):
        Load("http://x", concurrent=2, processes=3)


def test_target_adds_the_api_path_to_a_bare_url() -> None:
    meta = load_repository(MODEL_REPOSITORY)["digits"]
    assert Load("http://h:1").target(Bodies(meta, "infer")) == "http://h:1/infer"
    assert Load("http://h:1/").target(Bodies(meta, "v2")) == "http://h:1/v2/models/digits/infer"
    assert Load("http://h:1/predict").target(Bodies(meta, "infer")) == "http://h:1/predict"
