"""Validation at the edge: turn a request body into packed tensors, or say exactly what is wrong.

A tensor is checked against the model's metadata (datatype, shape) and packed into the raw bytes
the worker reads: floats with numpy (1,024 of them in 60 % of the time ``array`` takes), integers
and booleans with the standard library's ``array``. Outputs go back to JSON as numpy arrays, which
orjson writes without a Python object per element. One bad request is refused here, so it never
joins (and fails) a batch of good ones.

Every field is type-checked without walking nested values: names, keys, ``id`` and
``parameters`` are scalars, so the only nesting a request may carry is tensor data, nested
exactly as its shape (``flatten`` goes down ``len(shape)`` levels and refuses any list below).
Bodies nested deeper than orjson's parse limit (1,024 levels) are malformed JSON. Error
messages never ``repr`` a client's non-string value (``repr`` of a deep list overflows the
stack): they name its JSON type.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.errors import BadRequest
from tasks.contract import DATATYPES, Tensor
from tasks.metadata import ModelMetadata, TensorSpec

FLOATS = ("FP32", "FP64")  # packed with numpy

ELEMENT_TYPES: dict[str, tuple[type, ...]] = {
    "BOOL": (bool,),
    "FP32": (int, float),
    "FP64": (int, float),
}  # the integer datatypes take int

NAME_MAX_CHARS = 1024
"""Longest model, version or routing key (field or ``X-Routing-Key`` header) a request may send."""

SCALARS = (str, int, float, bool)  # what a ``parameters`` value may be (Open Inference Protocol)

JSON_TYPES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


def shown(value: Any) -> str:
    """``value`` for an error message: a string's repr (cut to 80 chars), else its JSON type."""
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:80] + "...")
    return JSON_TYPES.get(type(value), "null")


def json_object(data: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def name_field(value: Any, field: str) -> str | None:
    """A model, version or routing key: a string or an integer (not a bool), as a string.

    None when absent (``null``). Strings are capped at :data:`NAME_MAX_CHARS`.
    """
    if value is None:
        return None
    if type(value) is int:
        return str(value)
    if type(value) is not str:
        raise BadRequest(f"{field!r} must be a string or an integer, not {shown(value)}")
    if len(value) > NAME_MAX_CHARS:
        raise BadRequest(f"{field!r} is longer than {NAME_MAX_CHARS} characters")
    return value


def string_field(value: Any, field: str) -> str | None:
    """An optional string (the v2 request ``id``); None when absent."""
    if value is not None and type(value) is not str:
        raise BadRequest(f"{field!r} must be a string, not {shown(value)}")
    return value


def scalar_map(value: Any, field: str) -> dict[str, Any]:
    """Open Inference Protocol ``parameters``: an object of strings, numbers and booleans."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object, not {shown(value)}")
    for key, item in value.items():
        if not isinstance(item, SCALARS):
            raise BadRequest(f"{field} {shown(key)} must be a string, number or boolean, not {shown(item)}")
    return value


def flatten(data: Any, shape: tuple[int, ...], name: str) -> list[Any]:
    """Row-major elements of ``data``, which is either flat or nested exactly as ``shape``."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: data must be a list")
    if data and isinstance(data[0], list):
        level: list[Any] = [data]
        for dim in shape:
            nested: list[Any] = []
            for sub in level:
                if not isinstance(sub, list) or len(sub) != dim:
                    raise BadRequest(f"input {name!r}: data is not nested as shape {list(shape)}")
                nested.extend(sub)
            level = nested
        return level
    if len(data) != math.prod(shape):
        raise BadRequest(f"input {name!r}: shape {list(shape)} takes {math.prod(shape)} elements, got {len(data)}")
    return data


def pack(spec: TensorSpec, flat: list[Any]) -> bytes:
    """Check every element's type against ``spec.datatype`` and pack them."""
    allowed = ELEMENT_TYPES.get(spec.datatype, (int,))
    kinds = set(map(type, flat))
    if not kinds.issubset(allowed):
        bad = sorted(k.__name__ for k in kinds - set(allowed))
        raise BadRequest(f"input {spec.name!r}: datatype {spec.datatype} does not take {', '.join(bad)} values")
    try:
        if spec.datatype not in FLOATS:
            return array(DATATYPES[spec.datatype].typecode, flat).tobytes()
        with np.errstate(over="ignore"):  # a value beyond the type becomes inf: refused below
            values = np.array(flat, dtype=wire_dtype(spec.datatype))
        in_range = bool(np.isfinite(values).all())
    except OverflowError:  # an int beyond the type (or beyond a double)
        in_range = False
    if not in_range:
        raise BadRequest(f"input {spec.name!r}: a value is out of {spec.datatype} range")
    return values.tobytes()


def wire_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of ``datatype``'s raw bytes: little-endian, as the wire contract says."""
    return np.dtype("<" + DATATYPES[datatype].numpy)


def tensor(spec: TensorSpec, data: Any, shape: tuple[int, ...]) -> Tensor:
    if len(shape) != len(spec.shape) or tuple(shape[1:]) != spec.row_shape or shape[0] < 1:
        raise BadRequest(f"input {spec.name!r}: shape {list(shape)} does not match the model's {list(spec.shape)}")
    return Tensor(spec.name, spec.datatype, shape, pack(spec, flatten(data, shape, spec.name)))


def check_rows(meta: ModelMetadata, tensors: list[Tensor], max_rows: int) -> int:
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise BadRequest("all inputs must have the same number of rows")
    n = rows.pop()
    if n > max_rows:
        raise BadRequest(f"{n} rows is more than model {meta.name!r} takes in one request ({max_rows})")
    return n


@dataclass(frozen=True)
class SimpleInput:
    tensors: list[Tensor]
    rows: int
    single_row: bool  # the client sent one row as a flat list: answer one row


def parse_simple(meta: ModelMetadata, data: Any, max_rows: int) -> SimpleInput:
    """The simple API's ``input``: one row (flat list) or a list of rows, for the first input."""
    if len(meta.inputs) != 1:
        raise BadRequest(f"model {meta.name!r} has several inputs: use /v2/models/{meta.name}/infer")
    spec = meta.inputs[0]
    if not isinstance(data, list) or not data:
        raise BadRequest("'input' must be a non-empty list (one row) or a list of rows")
    single = not isinstance(data[0], list) and len(spec.row_shape) == 1
    rows = [data] if single else data
    t = tensor(spec, rows, (len(rows), *spec.row_shape))
    return SimpleInput([t], check_rows(meta, [t], max_rows), single)


class Blobs:
    """The binary part of a request body, handed out input by input in order."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    def take(self, size: int, name: str) -> bytes:
        if size > len(self._data) - self._at:
            left = len(self._data) - self._at
            raise BadRequest(f"input {name!r}: binary_data_size {size} but only {left} bytes of binary data are left")
        chunk = bytes(self._data[self._at : self._at + size])
        self._at += size
        return chunk

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._at, "the raw body")

    def finish(self) -> None:
        """Every byte must belong to an input."""
        left = len(self._data) - self._at
        if left:
            raise BadRequest(f"{left} bytes of binary data after the last binary input")


def binary_size(parameters: dict[str, Any], name: str) -> int | None:
    """An input's ``binary_data_size``: None when it sends JSON ``data`` instead."""
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer, not {shown(size)}")
    return size


def binary_tensor(spec: TensorSpec, shape: tuple[int, ...], data: bytes) -> Tensor:
    """An input's raw bytes, checked against its declared shape and datatype."""
    if len(shape) != len(spec.shape) or tuple(shape[1:]) != spec.row_shape or shape[0] < 1:
        raise BadRequest(f"input {spec.name!r}: shape {list(shape)} does not match the model's {list(spec.shape)}")
    expected = math.prod(shape) * DATATYPES[spec.datatype].itemsize
    if len(data) != expected:
        raise BadRequest(
            f"input {spec.name!r}: shape {list(shape)} of {spec.datatype} takes {expected} bytes, got {len(data)}"
        )
    if spec.datatype == "BOOL" and data.translate(None, b"\x00\x01"):
        raise BadRequest(f"input {spec.name!r}: BOOL data must be bytes 0 or 1")
    return Tensor(spec.name, spec.datatype, shape, data)


def parse_v2_inputs(
    meta: ModelMetadata, raw_inputs: Any, max_rows: int, blobs: Blobs | None = None
) -> tuple[list[Tensor], int]:
    """Open Inference Protocol ``inputs``: every declared input, once, with matching datatype."""
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    specs = {s.name: s for s in meta.inputs}
    given: dict[str, Tensor] = {}
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise BadRequest("each input must be an object with name, shape, datatype and data")
        name = raw.get("name")
        if type(name) is not str:
            raise BadRequest(f"inputs[{i}].name must be a string, not {shown(name)}")
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(f"model {meta.name!r} has no input {shown(name)} (it takes {sorted(specs)})")
        if name in given:
            raise BadRequest(f"input {name!r} is given twice")
        if raw.get("datatype") != spec.datatype:
            raise BadRequest(f"input {name!r}: datatype must be {spec.datatype}, got {shown(raw.get('datatype'))}")
        shape = raw.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise BadRequest(f"input {name!r}: shape must be a list of integers")
        size = binary_size(scalar_map(raw.get("parameters"), f"inputs[{i}].parameters"), name)
        if size is not None:
            if "data" in raw:
                raise BadRequest(f"input {name!r}: both data and binary_data_size")
            given[spec.name] = binary_tensor(spec, tuple(shape), (blobs or Blobs(b"")).take(size, name))
            continue
        if "data" not in raw:
            raise BadRequest(f"input {name!r}: no data")
        given[spec.name] = tensor(spec, raw["data"], tuple(shape))
    missing = sorted(set(specs) - set(given))
    if missing:
        raise BadRequest(f"missing inputs: {missing}")
    if blobs is not None:
        blobs.finish()
    tensors = [given[s.name] for s in meta.inputs]
    return tensors, check_rows(meta, tensors, max_rows)


def parse_v2_outputs(meta: ModelMetadata, raw_outputs: Any, binary: bool = False) -> dict[str, bool]:
    """The outputs a v2 request asks for (all when it names none), each with whether it wants it as
    binary data (``parameters.binary_data``; ``binary`` is the request's ``binary_data_output``)."""
    if raw_outputs is None:
        return {o.name: binary for o in meta.outputs}
    if not isinstance(raw_outputs, list):
        raise BadRequest(f"'outputs' must be a list, not {shown(raw_outputs)}")
    declared = [o.name for o in meta.outputs]
    names: dict[str, bool] = {}
    for i, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict):
            raise BadRequest(f"outputs[{i}] must be an object with a name, not {shown(raw)}")
        name = raw.get("name")
        if type(name) is not str:
            raise BadRequest(f"outputs[{i}].name must be a string, not {shown(name)}")
        if name not in declared:
            raise BadRequest(f"unknown outputs: {shown(name)}; model {meta.name!r} has {declared}")
        params = scalar_map(raw.get("parameters"), f"outputs[{i}].parameters")
        wanted = params.get("binary_data")
        names[name] = binary if wanted is None else flag(wanted, f"outputs[{i}].parameters.binary_data")
    return names


def flag(value: Any, field: str) -> bool:
    """``binary_data`` or ``binary_data_output``: a boolean when given."""
    if value is None:
        return False
    if type(value) is not bool:
        raise BadRequest(f"{field} must be a boolean, not {shown(value)}")
    return value


def unpack(datatype: str, data: bytes) -> np.ndarray:
    """A worker's raw output bytes as a flat array, for :func:`app.api.json_response` (orjson writes
    numpy arrays itself; FP32 in the shortest form that reads back as the same FP32 value)."""
    return np.frombuffer(data, dtype=wire_dtype(datatype))
