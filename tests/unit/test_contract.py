"""The wire contract: what is encoded decodes to the same; anything else raises ContractError only."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashing.membership import MAX_WEIGHT, Member
from tasks.contract import (
    ANNOUNCEMENTS,
    CONTRACT_VERSION,
    WHOLE_TABLE,
    BadItem,
    ContractError,
    Drops,
    ErrorKind,
    Failure,
    Item,
    Result,
    ShardStatus,
    Tensor,
    decode_envelope,
    decode_replies,
    decode_shard_statuses,
    encode_envelope,
    encode_replies,
    encode_shard_statuses,
    reply_key,
    shard_status_key,
    shard_table_name,
)

REPLY_TO = reply_key("gw-1")
PIXELS = Tensor("pixels", "FP32", (2, 64), b"\0" * 512)

# Any value msgpack can carry, nested.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def test_envelope_round_trip() -> None:
    item = Item("gw-1:7", "digits", "1", 250.0, (PIXELS,))
    wire = msgpack.unpackb(msgpack.packb(encode_envelope(REPLY_TO, [item])))
    assert decode_envelope(wire).items == (item,)
    assert decode_envelope(wire).reply_to == REPLY_TO


def test_replies_round_trip() -> None:
    replies = [
        Result("a", "w1", 3, "1", (Tensor("probabilities", "FP32", (1, 10), b"\1" * 40),)),
        Failure("b", "w1", ErrorKind.EXPIRED, "too late"),
    ]
    assert decode_replies(encode_replies(replies)) == (replies, [])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"v": 1}, "contract version 1"),
        ({"v": None}, "contract version None"),
        ({"reply_to": "ringserve:members"}, "not a reply list"),
        ({"reply_to": 5}, "reply_to"),
        ({"items": "x"}, "items must be a list"),
    ],
)
def test_bad_envelope_header_raises(change: dict[str, Any], words: str) -> None:
    wire = {**encode_envelope(REPLY_TO, []), **change}
    with pytest.raises(ContractError, match=words):
        decode_envelope(wire)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"budget_ms": "soon"}, "budget_ms"),
        ({"budget_ms": math.nan}, "budget_ms"),
        ({"budget_ms": True}, "budget_ms"),
        ({"model": ["digits"]}, "model"),
        ({"inputs": [["pixels", "FP32", [2, 64], b"\0"]]}, "not \\[2, 64\\] FP32"),
        ({"inputs": [["pixels", "FP128", [2, 64], b""]]}, "unknown datatype"),
        ({"inputs": [["pixels", "FP32", [0, 64], b""]]}, "no rows"),
        ({"inputs": [["pixels", "FP32", [1, -64], b""]]}, "negative"),
        ({"inputs": [["pixels", "FP32", [True, 64], b""]]}, "shape"),
        ({"inputs": [["pixels", "FP32", [1, 64], "text"]]}, "data"),
        ({"inputs": [PIXELS.wire(), ["x", "FP32", [1, 1], b"\0" * 4]]}, "differ in their number of rows"),
        ({"inputs": []}, "inputs"),
    ],
)
def test_bad_item_is_refused_alone_with_its_id(change: dict[str, Any], words: str) -> None:
    good = Item("good", "digits", "1", 1.0, (PIXELS,))
    bad = {**Item("bad", "digits", "1", 1.0, (PIXELS,)).wire(), **change}
    wire = {**encode_envelope(REPLY_TO, [good]), "items": [good.wire(), bad, 7]}
    items = decode_envelope(wire).items
    assert items[0] == good
    assert isinstance(items[1], BadItem) and items[1].id == "bad"
    assert items[2] == BadItem(None, "an item must be a map, got int")
    with pytest.raises(ContractError, match=words):
        from tasks.contract import decode_item

        decode_item(bad)


def test_bad_replies_are_refused_one_by_one() -> None:
    good = Failure("a", "w1", ErrorKind.BAD_INPUT, "no")
    blob = msgpack.packb(
        {"v": CONTRACT_VERSION, "replies": [{"id": "a", "node": "w1", "error": "bad_input", "message": "no"}, 3, {}]}
    )
    replies, refused = decode_replies(blob)
    assert replies == [good] and len(refused) == 2


@pytest.mark.parametrize(
    "blob",
    [b"", b"\xc1", b"garbage", msgpack.packb([1]), msgpack.packb({"v": 1, "replies": []}), msgpack.packb({1: 2})],
)
def test_bad_reply_blob_raises(blob: bytes) -> None:
    with pytest.raises(ContractError):
        decode_replies(blob)


@settings(max_examples=500, derandomize=True, database=None)
@given(values)
def test_any_value_decodes_or_raises_contract_error(value: Any) -> None:
    for decode in (decode_envelope, lambda v: decode_replies(msgpack.packb(v))):
        try:
            decode(value)
        except ContractError:
            pass


@settings(max_examples=300, derandomize=True, database=None)
@given(st.dictionaries(st.sampled_from(["v", "reply_to", "items"]), values))
def test_envelope_like_maps_decode_or_raise_contract_error(value: dict[str, Any]) -> None:
    try:
        decode_envelope({"v": CONTRACT_VERSION, "reply_to": REPLY_TO, **value})
    except ContractError:
        pass


@settings(max_examples=300, derandomize=True, database=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_blob_or_a_contract_error(blob: bytes) -> None:
    try:
        decode_replies(blob)
    except ContractError:
        pass


def test_announcement_round_trip_and_bounds() -> None:
    member = Member(2.5, "abc")
    assert ANNOUNCEMENTS.decode(ANNOUNCEMENTS.encode(member)) == member
    for weight in ("0", "-1", "NaN", "Infinity", str(MAX_WEIGHT * 2), '"1"', "true"):
        raw = f'{{"v": {CONTRACT_VERSION}, "weight": {weight}, "incarnation": "a"}}'.encode()
        with pytest.raises(ContractError):
            ANNOUNCEMENTS.decode(raw)
    for raw in (b"{", b"[]", b'{"weight": 1, "incarnation": "a"}', b"\xff"):
        with pytest.raises(ContractError):
            ANNOUNCEMENTS.decode(raw)


@pytest.mark.parametrize("node_id", ["worker_1", "w", "gpu-box.7"])
def test_valid_node_ids(node_id: str) -> None:
    assert ANNOUNCEMENTS.valid_node_id(node_id)


@pytest.mark.parametrize("node_id", ["", "../x", "a b", "x" * 65, "_lead", "w\n"])
def test_invalid_node_ids(node_id: str) -> None:
    assert not ANNOUNCEMENTS.valid_node_id(node_id)


def test_drops_count_and_hand_over() -> None:
    drops = Drops("test", log_every_s=3600)
    for _ in range(5):
        drops.drop("junk", "because")
    assert drops.total == 5 and drops.take() == 5 and drops.take() == 0


# --- shard reports -----------------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "ring": "0123abcd0123abcd",
    "held": 10,
    "loaded": 12,
    "dropped": 2,
    "read_through": 3,
    "load_s": 0.25,
}

# Any value JSON can carry, nested (NaN and infinities included: Python's json writes and reads them).
json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
counts = st.integers(min_value=0, max_value=2**63)
statuses = st.dictionaries(
    st.text(min_size=1, max_size=30),
    st.builds(
        ShardStatus,
        st.one_of(st.just(WHOLE_TABLE), st.text(min_size=1, max_size=16)),
        counts,
        counts,
        counts,
        counts,
        st.floats(min_value=0, max_value=1e6),
    ),
    max_size=4,
)


def shard_report(**tables: Any) -> str:
    return json.dumps({"v": CONTRACT_VERSION, "tables": tables})


def test_shard_status_names() -> None:
    assert shard_status_key("worker_1") == "ringserve:shards:worker_1"
    assert shard_table_name("ranker", "1") == "ranker/1"


def test_shard_statuses_round_trip() -> None:
    sent = {"ranker/1": ShardStatus(**STATUS), "other/2": ShardStatus(WHOLE_TABLE, 5, 5, 0, 0, 0.0)}
    raw = encode_shard_statuses(sent)
    assert decode_shard_statuses(raw) == sent
    assert decode_shard_statuses(raw.decode()) == sent
    assert decode_shard_statuses(encode_shard_statuses({})) == {}
    integral = decode_shard_statuses(shard_report(t={**STATUS, "load_s": 1}))
    assert integral == {"t": ShardStatus(**{**STATUS, "load_s": 1.0})}


@settings(max_examples=100, deadline=None)
@given(statuses)
def test_any_shard_statuses_round_trip(sent: dict[str, ShardStatus]) -> None:
    assert decode_shard_statuses(encode_shard_statuses(sent)) == sent


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"\xff",
        b"[]",
        b"null",
        json.dumps({"tables": {"t": STATUS}}),
        json.dumps({"v": 1, "tables": {"t": STATUS}}),
        json.dumps({"v": str(CONTRACT_VERSION), "tables": {"t": STATUS}}),
        json.dumps({"v": CONTRACT_VERSION}),
        json.dumps({"v": CONTRACT_VERSION, "tables": [STATUS]}),
        shard_report(t=[1, 2]),
        shard_report(t={k: v for k, v in STATUS.items() if k != "ring"}),
        shard_report(t={**STATUS, "ring": ""}),
        shard_report(t={**STATUS, "ring": 7}),
        shard_report(t={k: v for k, v in STATUS.items() if k != "load_s"}),
        shard_report(t={**STATUS, "load_s": math.nan}),
        shard_report(t={**STATUS, "load_s": math.inf}),
        shard_report(t={**STATUS, "load_s": -0.5}),
        shard_report(t={**STATUS, "load_s": "0.5"}),
        shard_report(t={**STATUS, "load_s": True}),
        *(shard_report(t={**STATUS, k: -1}) for k in ("held", "loaded", "dropped", "read_through")),
        *(shard_report(t={**STATUS, k: 1.5}) for k in ("held", "loaded", "dropped", "read_through")),
        *(shard_report(t={**STATUS, k: "3"}) for k in ("held", "loaded", "dropped", "read_through")),
        *(shard_report(t={**STATUS, k: True}) for k in ("held", "loaded", "dropped", "read_through")),
        *(shard_report(t={k: v for k, v in STATUS.items() if k != gone}) for gone in ("held", "read_through")),
        shard_report(**{"": STATUS}),
        shard_report(**{"x" * 300: STATUS}),
    ],
)
def test_bad_shard_report_raises(raw: bytes | str) -> None:
    with pytest.raises(ContractError):
        decode_shard_statuses(raw)


@settings(max_examples=300, derandomize=True, database=None)
@given(json_values)
def test_any_json_is_a_shard_report_or_a_contract_error(value: Any) -> None:
    try:
        decode_shard_statuses(json.dumps(value))
    except ContractError:
        pass


@settings(max_examples=300, derandomize=True, database=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.just(CONTRACT_VERSION) | json_scalars,
            "tables": st.dictionaries(
                st.text(max_size=5),
                st.dictionaries(st.sampled_from(sorted(STATUS)), json_scalars, max_size=6) | json_scalars,
                max_size=3,
            ),
        },
    )
)
def test_report_like_json_decodes_or_raises_contract_error(body: dict[str, Any]) -> None:
    try:
        decode_shard_statuses(json.dumps(body))
    except ContractError:
        pass


@settings(max_examples=200, derandomize=True, database=None)
@given(st.sampled_from(sorted(STATUS)), json_values)
def test_one_bad_field_decodes_or_raises_contract_error(field: str, value: Any) -> None:
    try:
        decoded = decode_shard_statuses(shard_report(t={**STATUS, field: value}))
    except ContractError:
        return
    assert getattr(decoded["t"], field) == value  # only a valid value gets through


def test_deeply_nested_shard_report_raises_contract_error() -> None:
    with pytest.raises(ContractError):
        decode_shard_statuses("[" * 100_000)


def test_huge_integer_load_s_raises_contract_error() -> None:
    with pytest.raises(ContractError):
        decode_shard_statuses(shard_report(t={**STATUS, "load_s": 10**400}))
