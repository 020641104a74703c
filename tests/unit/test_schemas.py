"""Validation at the edge, without Redis: shapes, datatypes, packing."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import BadRequest
from app.schemas import flatten, nest, pack, parse_simple, parse_v2_inputs, unpack
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
    assert unpack("FP32", packed) == np.array(values, np.float32).tolist()


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
        assert unpack(datatype, packed) == values


def test_nest_restores_rows() -> None:
    assert nest([1, 2, 3, 4, 5, 6], [1, 2, 3]) == [[[1, 2, 3], [4, 5, 6]]]
    assert nest(list(range(4)), [2, 2]) == [[0, 1], [2, 3]]


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
