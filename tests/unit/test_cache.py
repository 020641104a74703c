"""The response cache's pure parts: its key, its stored encoding, and the config that switches it on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.cache import digest
from tasks.contract import (
    CACHE_LOCK_PREFIX,
    CONTRACT_VERSION,
    ContractError,
    Result,
    Tensor,
    decode_cached,
    encode_cached,
)
from tasks.metadata import ModelConfigError, load_metadata
from tasks.settings import CACHE_MAX_BYTES, CACHE_TTL_S, Settings

PIXELS = Tensor("pixels", "FP32", (1, 2), b"\x00\x00\x80?\x00\x00\x00@")
RESULT = Result("gw-1:3", "worker_2", 7, "1", (Tensor("probabilities", "FP32", (1, 2), b"\x01" * 8),))


def test_the_key_changes_with_everything_a_deterministic_answer_depends_on() -> None:
    base = digest("digits", "1", [PIXELS])
    variants = [
        digest("heavy", "1", [PIXELS]),
        digest("digits", "2", [PIXELS]),
        digest("digits", "1", [Tensor("other", "FP32", (1, 2), PIXELS.data)]),
        digest("digits", "1", [Tensor("pixels", "INT32", (1, 2), PIXELS.data)]),
        digest("digits", "1", [Tensor("pixels", "FP32", (2, 1), PIXELS.data)]),
        digest("digits", "1", [Tensor("pixels", "FP32", (1, 2), PIXELS.data[::-1])]),
    ]
    assert digest("digits", "1", [PIXELS]) == base and len(base) == 64  # stable, 256 bits
    assert len({base, *variants}) == len(variants) + 1


def test_bytes_cannot_move_between_tensors_or_into_names() -> None:
    """Shapes fix lengths: two tensors' bytes split differently, or a name absorbing a version, differ."""
    a = [Tensor("a", "UINT8", (1, 2), b"xy"), Tensor("b", "UINT8", (1, 1), b"z")]
    b = [Tensor("a", "UINT8", (1, 1), b"x"), Tensor("b", "UINT8", (1, 2), b"yz")]
    assert digest("m", "1", a) != digest("m", "1", b)
    assert digest("m1", "2", [PIXELS]) != digest("m", "12", [PIXELS])


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_different_bytes_different_keys(x: bytes, y: bytes) -> None:
    tx, ty = (Tensor("t", "UINT8", (1, len(v)), v) for v in (x, y))
    assert (digest("m", "1", [tx]) == digest("m", "1", [ty])) == (x == y)


def test_a_stored_result_decodes_to_itself_answering_another_request() -> None:
    decoded = decode_cached(encode_cached(RESULT), "f" * 64)
    assert decoded == Result("f" * 64, RESULT.node, RESULT.batch_size, RESULT.version, RESULT.outputs)


def packed(body: Any) -> bytes:
    return msgpack.packb(body)


def good() -> dict[str, Any]:
    return msgpack.unpackb(encode_cached(RESULT))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\xc1",  # never used by msgpack
        CACHE_LOCK_PREFIX + b"gw-1:1",  # a lock is not an answer
        packed([1, 2]),
        packed(good() | {"v": CONTRACT_VERSION + 1}),
        packed(good() | {"error": "bad_input", "message": "no"}),
        packed(good() | {"outputs": [["probabilities", "FP32", [1, 2], b"\x01" * 7]]}),  # 7 bytes for 8
        packed(good() | {"batch_size": 0}),
        packed({k: v for k, v in good().items() if k != "node"}),
    ],
)
def test_garbage_read_back_is_refused_with_a_contract_error(blob: bytes) -> None:
    with pytest.raises(ContractError):
        decode_cached(blob, "f" * 64)


def model_dir(tmp_path: Path, **fields: Any) -> Path:
    config = json.loads((Path(__file__).resolve().parents[2] / "models" / "digits" / "config.json").read_text())
    config.pop("deterministic", None)
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "config.json").write_text(json.dumps(config | fields))
    return tmp_path / "digits"


@pytest.mark.parametrize(
    ("fields", "cached"),
    [
        ({}, False),
        ({"deterministic": True}, True),
        ({"deterministic": True, "response_cache": False}, False),
        ({"deterministic": False}, False),
        ({"response_cache": True}, True),
    ],
)
def test_the_config_switches_the_cache_per_model(tmp_path: Path, fields: dict[str, Any], cached: bool) -> None:
    assert load_metadata(model_dir(tmp_path, **fields)).response_cache is cached


@pytest.mark.parametrize("fields", [{"deterministic": "yes"}, {"response_cache": 1}])
def test_the_flags_must_be_booleans(tmp_path: Path, fields: dict[str, Any]) -> None:
    with pytest.raises(ModelConfigError, match="true or false"):
        load_metadata(model_dir(tmp_path, **fields))


def test_settings_of_the_cache() -> None:
    default = Settings.from_env({})
    assert (default.cache, default.cache_ttl_s, default.cache_max_bytes) == (True, CACHE_TTL_S, CACHE_MAX_BYTES)
    env = {
        "RINGSERVE_CACHE": "off",
        "RINGSERVE_CACHE_TTL_S": "5",
        "RINGSERVE_CACHE_MAX_BYTES": "1000",
        "RINGSERVE_CACHE_REDIS_URL": "redis://:secret@cache:6379/1",
    }
    s = Settings.from_env(env)
    assert (s.cache, s.cache_ttl_s, s.cache_max_bytes) == (False, 5, 1000)
    assert "secret" not in repr(s)
