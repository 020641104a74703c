"""Validation at the edge, without Redis: shapes, datatypes, packing."""

from __future__ import annotations

from array import array

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import BadRequest
from app.schemas import (
    NAME_MAX_CHARS,
    flatten,
    name_field,
    pack,
    parse_simple,
    parse_v2_inputs,
    parse_v2_outputs,
    scalar_map,
    shown,
    string_field,
    unpack,
)
from tasks.contract import DATATYPES
from tasks.metadata import ModelMetadata, TensorSpec


def model(*inputs: TensorSpec) -> ModelMetadata:
    out = (TensorSpec("y", "FP32", (-1, 2)),)
    return ModelMetadata("m", ("1",), "1", inputs, out, None, None, None, {}, None)  # type: ignore[arg-type]


IMG = TensorSpec("img", "FP32", (-1, 2, 3))


def test_nested_and_flat_data_give_the_same_bytes() -> None:
    nested = [[[1, 2, 3], [4, 5, 6]]]
    assert flatten(nested, (1, 2, 3), "img") == flatten([1, 2, 3, 4, 5, 6], (1, 2, 3), "img")


@pytest.mark.parametrize("data", [[[[1, 2, 3], [4, 5]]], [[[1, 2, 3]]], [[1, 2, 3, 4, 5, 6]], [1, 2, 3], "abc"])
def test_wrong_shapes_are_refused(data: object) -> None:
    with pytest.raises(BadRequest):
        flatten(data, (1, 2, 3), "img")


@pytest.mark.parametrize(
    ("datatype", "values"),
    [("FP32", [1, "2"]), ("FP32", [True]), ("INT32", [1.5]), ("INT32", [2**40]), ("BOOL", [1]), ("INT64", [None])],
)
def test_wrong_element_types_are_refused(datatype: str, values: list) -> None:
    with pytest.raises(BadRequest):
        pack(TensorSpec("x", datatype, (-1, len(values))), values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=50))
def test_fp32_round_trip_matches_numpy(values: list[float]) -> None:
    packed = pack(TensorSpec("x", "FP32", (-1, len(values))), values)
    assert np.array_equal(np.frombuffer(packed, DATATYPES["FP32"].numpy), np.array(values, np.float32))
    as_json = orjson.loads(orjson.dumps(unpack("FP32", packed), option=orjson.OPT_SERIALIZE_NUMPY))
    assert np.array_equal(np.array(as_json, np.float32), np.array(values, np.float32))  # reads back exactly


def test_every_datatype_round_trips() -> None:
    samples = {
        "BOOL": [True, False],
        "UINT8": [0, 255],
        "INT8": [-128, 127],
        "INT16": [-3, 3],
        "INT32": [-(2**31), 2**31 - 1],
        "INT64": [-(2**63), 2**63 - 1],
        "FP32": [0.5, -2.0],
        "FP64": [1e300, 0.1],
    }
    assert set(samples) == set(DATATYPES)
    for datatype, values in samples.items():
        packed = pack(TensorSpec("x", datatype, (-1, 2)), values)
        assert np.frombuffer(packed, DATATYPES[datatype].numpy).tolist() == values
        assert orjson.loads(orjson.dumps(unpack(datatype, packed), option=orjson.OPT_SERIALIZE_NUMPY)) == values


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("FP32", 3.5e38), ("FP32", -1e39), ("FP32", 2**200), ("FP64", 2**1100), ("INT8", 128), ("UINT8", -1)],
)
def test_values_beyond_the_datatype_are_refused(datatype: str, value: float) -> None:
    with pytest.raises(BadRequest, match=f"out of {datatype} range"):
        pack(TensorSpec("x", datatype, (-1, 2)), [1, value])


def test_simple_input_one_row_or_many() -> None:
    meta = model(TensorSpec("x", "FP32", (-1, 3)))
    one = parse_simple(meta, [1, 2, 3], max_rows=4)
    assert one.single_row and one.rows == 1 and one.tensors[0].shape == (1, 3)
    many = parse_simple(meta, [[1, 2, 3], [4, 5, 6]], max_rows=4)
    assert not many.single_row and many.rows == 2
    with pytest.raises(BadRequest, match="5 rows"):
        parse_simple(meta, [[1, 2, 3]] * 5, max_rows=4)


def test_v2_inputs_all_present_same_rows() -> None:
    meta = model(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1, 1)))
    tensors, rows = parse_v2_inputs(
        meta,
        [
            {"name": "b", "datatype": "INT64", "shape": [2, 1], "data": [7, 8]},
            {"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
        ],
        max_rows=32,
    )
    assert rows == 2 and [t.name for t in tensors] == ["a", "b"]
    assert tensors[1].data == array("q", [7, 8]).tobytes()
    with pytest.raises(BadRequest, match="missing inputs"):
        parse_v2_inputs(meta, [{"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}], 32)
    with pytest.raises(BadRequest, match="same number of rows"):
        parse_v2_inputs(
            meta,
            [
                {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
                {"name": "b", "datatype": "INT64", "shape": [2, 1], "data": [1, 2]},
            ],
            32,
        )
    with pytest.raises(BadRequest, match="given twice"):
        parse_v2_inputs(meta, [{"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}] * 2, 32)


DIGITS = model(TensorSpec("pixels", "FP32", (-1, 2)))
PIXELS = {"name": "pixels", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
DEEP = orjson.loads(b"[" * 1000 + b"]" * 1000)  # repr() of this overflows the stack
HOSTILE = [True, 1.5, [], {}, ["a"], {"a": 1}, DEEP]


@pytest.mark.parametrize("value", HOSTILE, ids=["bool", "float", "list", "object", "list-of-str", "map", "deep"])
def test_names_and_keys_are_strings_or_integers(value: object) -> None:
    with pytest.raises(BadRequest, match="'key' must be a string or an integer"):
        name_field(value, "key")
    assert name_field("user-42", "key") == "user-42" and name_field(42, "key") == "42"
    assert name_field(None, "key") is None


def test_string_names_are_capped() -> None:
    assert name_field("k" * NAME_MAX_CHARS, "key") == "k" * NAME_MAX_CHARS
    with pytest.raises(BadRequest, match=f"longer than {NAME_MAX_CHARS}"):
        name_field("k" * (NAME_MAX_CHARS + 1), "key")


@pytest.mark.parametrize("value", [7, *HOSTILE], ids=["int", "bool", "float", "list", "object", "strs", "map", "deep"])
def test_v2_id_is_a_string(value: object) -> None:
    with pytest.raises(BadRequest, match="'id' must be a string"):
        string_field(value, "id")
    assert string_field("req-1", "id") == "req-1" and string_field(None, "id") is None


@pytest.mark.parametrize("value", [[], "x", 3, DEEP])
def test_parameters_must_be_an_object(value: object) -> None:
    with pytest.raises(BadRequest, match="parameters must be an object"):
        scalar_map(value, "parameters")


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, DEEP])
def test_parameter_values_are_scalars(value: object) -> None:
    with pytest.raises(BadRequest, match="must be a string, number or boolean"):
        scalar_map({"timeout": 5, "x": value}, "parameters")
    params = {"s": "a", "i": 1, "f": 0.5, "b": True}
    assert scalar_map(params, "parameters") == params and scalar_map(None, "parameters") == {}


@pytest.mark.parametrize("name", [["pixels"], {"a": 1}, 3, None, DEEP])
def test_v2_input_name_must_be_a_string(name: object) -> None:
    with pytest.raises(BadRequest, match=r"inputs\[0\]\.name must be a string"):
        parse_v2_inputs(DIGITS, [{**PIXELS, "name": name}], 32)


def test_v2_errors_name_a_deep_value_by_its_type() -> None:
    with pytest.raises(BadRequest, match="got a list"):
        parse_v2_inputs(DIGITS, [{**PIXELS, "datatype": DEEP}], 32)


def test_v2_input_parameters_are_scalars() -> None:
    with pytest.raises(BadRequest, match=r"inputs\[0\]\.parameters 'p' must be"):
        parse_v2_inputs(DIGITS, [{**PIXELS, "parameters": {"p": [1]}}], 32)


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        ({"name": "y"}, "'outputs' must be a list"),
        (["y"], r"outputs\[0\] must be an object"),
        ([{"name": ["y"]}], r"outputs\[0\]\.name must be a string"),
        ([{}], r"outputs\[0\]\.name must be a string"),
        ([{"name": DEEP}], r"outputs\[0\]\.name must be a string"),
        ([{"name": "y"}, {"name": "z"}], "unknown outputs: 'z'"),
        ([{"name": "y", "parameters": {"binary_data": [True]}}], r"outputs\[0\]\.parameters 'binary_data'"),
        ([{"name": "y", "parameters": "x"}], r"outputs\[0\]\.parameters must be an object"),
    ],
)
def test_v2_outputs_are_objects_with_a_declared_name(outputs: object, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        parse_v2_outputs(DIGITS, outputs)
    assert parse_v2_outputs(DIGITS, [{"name": "y", "parameters": {"binary_data": False}}]) == {"y": False}
    assert parse_v2_outputs(DIGITS, [{"name": "y", "parameters": {"binary_data": True}}]) == {"y": True}
    assert parse_v2_outputs(DIGITS, [{"name": "y"}], binary=True) == {"y": True}
    assert parse_v2_outputs(DIGITS, None) == {"y": False}
    assert parse_v2_outputs(DIGITS, None, binary=True) == {"y": True}
    with pytest.raises(BadRequest, match="binary_data must be a boolean"):
        parse_v2_outputs(DIGITS, [{"name": "y", "parameters": {"binary_data": 1}}])


def test_shown_never_reprs_a_nested_value() -> None:
    assert shown(DEEP) == "a list" and shown({"a": DEEP}) == "an object" and shown(None) == "null"
    assert shown("x" * 1000) == repr("x" * 80 + "...")


def test_nesting_limit() -> None:
    """The documented limit: orjson parses at most 1,024 levels (deeper is malformed JSON, a 400);
    tensor data is nested exactly as its shape, and a list below the last level is refused."""
    orjson.loads(b"[" * 1024 + b"]" * 1024)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" * 1025 + b"]" * 1025)
    with pytest.raises(BadRequest, match="does not take list"):
        parse_v2_inputs(DIGITS, [{**PIXELS, "data": [[1, DEEP]]}], 32)
    with pytest.raises(BadRequest, match="does not take list"):
        parse_simple(DIGITS, [1, DEEP], 32)
