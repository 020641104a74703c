"""The Open Inference Protocol's binary tensor data extension, as Triton specifies it.

A request whose ``Inference-Header-Content-Length`` header is N carries N bytes of JSON, then the
raw data of every input that declares ``parameters.binary_data_size``, in the order of ``inputs``:
little-endian, row-major, no padding (BOOL one byte per element). A header of 0 means the whole body
is the raw data of the model's only input. Outputs asked for with ``parameters.binary_data`` (or all,
with the request's ``parameters.binary_data_output``) come back the same way, after the JSON.

Raw bytes go from the body into the wire contract's tensors and back untouched: no element ever
becomes a Python object on this path.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.errors import BadRequest
from app.schemas import Blobs, binary_tensor, json_object, shown
from tasks.contract import DATATYPES, Tensor
from tasks.metadata import ModelMetadata

HEADER = "Inference-Header-Content-Length"
EXTENSION = "binary_tensor_data"
MEDIA_TYPE = "application/octet-stream"


def split(body: bytes, header_length: str | None) -> tuple[dict[str, Any] | None, Blobs]:
    """The JSON part (None for a raw single-input body) and the binary part of a request body."""
    if header_length is None:
        return json_object(body), Blobs(b"")
    if not header_length.isascii() or not header_length.isdigit():
        raise BadRequest(f"{HEADER} must be a non-negative integer, not {shown(header_length)}")
    n = int(header_length)
    if n > len(body):
        raise BadRequest(f"{HEADER} is {n} but the body has only {len(body)} bytes")
    if n == 0:
        return None, Blobs(body)
    return json_object(body[:n]), Blobs(body[n:])


def raw_input(meta: ModelMetadata, blobs: Blobs) -> Tensor:
    """``Inference-Header-Content-Length: 0``: the whole body is the one input's rows."""
    if len(meta.inputs) != 1:
        raise BadRequest(f"a raw binary body needs a model with one input; {meta.name!r} has {len(meta.inputs)}")
    spec = meta.inputs[0]
    row_bytes = spec.row_size * DATATYPES[spec.datatype].itemsize
    data = blobs.rest()
    if not data or len(data) % row_bytes:
        raise BadRequest(f"input {spec.name!r}: a raw body must be whole rows of {row_bytes} bytes, got {len(data)}")
    return binary_tensor(spec, (len(data) // row_bytes, *spec.row_shape), data)


def response(head: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a response whose binary outputs follow its JSON."""
    json_part = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)  # JSON outputs are numpy arrays
    return json_part + b"".join(blobs), {HEADER: str(len(json_part))}
