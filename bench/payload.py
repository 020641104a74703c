"""Request bodies for the simple API and the Open Inference Protocol, and what a reply tells us.

Bodies are assembled from pre-encoded pieces (one JSON row per input in a small pool), so the
load generator spends microseconds, not a JSON encoder's time, per request. Rows are random but
seeded, in the range the model expects; key i always sends pool row i mod pool size, so a
repeated key repeats its input (what a result cache would see).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from tasks.contract import DATATYPES
from tasks.metadata import ModelMetadata

APIS = ("infer", "v2")
BINARY = "binary"  # v2 with the binary tensor extension, as tritonclient sends it (wrk only)
BINARY_HEADER = "Inference-Header-Content-Length"
POOL_ROWS = 256
DIGITS_MAX_PIXEL = 16  # digits takes 8x8 intensities 0..16


@dataclass(frozen=True)
class Reply:
    """What a 200 answer says about how it was served (None where the server does not say)."""

    valid: bool
    node: str | None = None
    batch_size: int | None = None
    cached: bool | None = None
    error: str | None = None  # why an answer is not valid, when it says more than "no output"


def input_rows(meta: ModelMetadata, count: int, seed: int) -> list[list[float]]:
    """``count`` rows for the model's first input: integer pixels for digits, N(0, 1) otherwise."""
    width = meta.inputs[0].row_size
    rng = np.random.default_rng(seed)
    if meta.name == "digits":
        rows = rng.integers(0, DIGITS_MAX_PIXEL + 1, (count, width)).astype(np.float32)
    else:
        rows = rng.standard_normal((count, width), dtype=np.float32).round(4)
    return rows.tolist()  # type: ignore[no-any-return]


class Bodies:
    """Builds the bytes of one request for ``api`` ("infer" or "v2") from a key index."""

    def __init__(self, meta: ModelMetadata, api: str, seed: int = 0, pool: int = POOL_ROWS) -> None:
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        self.api = api
        self.path = "/infer" if api == "infer" else f"/v2/models/{meta.name}/infer"
        spec = meta.inputs[0]
        rows = [orjson.dumps(row) for row in input_rows(meta, pool, seed)]
        if api == "infer":
            self._head = b'{"model":' + orjson.dumps(meta.name) + b',"key":"'
            self._pieces = [b'","input":[' + row + b"]}" for row in rows]
        else:
            self._head = b'{"parameters":{"routing_key":"'
            tensor = b'"}, "inputs":[{"name":%s,"shape":[1,%d],"datatype":%s,"data":' % (
                orjson.dumps(spec.name),
                spec.row_size,
                orjson.dumps(spec.datatype),
            )
            self._pieces = [tensor + row + b"}]}" for row in rows]

    def body(self, key: str, index: int) -> bytes:
        return self._head + key.encode() + self._pieces[index % len(self._pieces)]

    def parse(self, raw: bytes, index: int = 0) -> Reply:
        """Read node, batch size and cached flag from a 200 answer to request ``index``; invalid if it has no output."""
        try:
            doc: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Reply(False)
        if not isinstance(doc, dict):
            return Reply(False)
        if self.api == "infer":
            return Reply("output" in doc, doc.get("node"), doc.get("batch_size"), doc.get("cached"))
        params = doc.get("parameters") or {}
        return Reply("outputs" in doc, params.get("node"), params.get("batch_size"), params.get("cached"))


class BinaryBodies:
    """Request bodies exactly as ``tritonclient[http]`` builds them with its defaults (binary input,
    binary outputs: ``InferenceServerClient.generate_request_body``), one row each, from the same
    seeded rows as :class:`Bodies`. There is no routing key: the gateway hashes the input bytes."""

    def __init__(self, meta: ModelMetadata, seed: int = 0, pool: int = POOL_ROWS) -> None:
        import tritonclient.http as triton  # a test and benchmark dependency (requirements-dev.txt)

        self.api = BINARY
        self.path = f"/v2/models/{meta.name}/infer"
        spec = meta.inputs[0]
        dtype = np.dtype("<" + DATATYPES[spec.datatype].numpy)
        self._requests: list[tuple[bytes, dict[str, str]]] = []
        for row in input_rows(meta, pool, seed):
            given = triton.InferInput(spec.name, [1, spec.row_size], spec.datatype)
            given.set_data_from_numpy(np.asarray([row], dtype=dtype))
            body, json_size = triton.InferenceServerClient.generate_request_body([given])
            self._requests.append((body, {BINARY_HEADER: str(json_size)}))

    def request(self, index: int) -> tuple[bytes, dict[str, str]]:
        """The body and the headers it needs."""
        return self._requests[index % len(self._requests)]


def bodies_for(meta: ModelMetadata, api: str, seed: int = 0) -> Bodies | BinaryBodies:
    return BinaryBodies(meta, seed) if api == BINARY else Bodies(meta, api, seed)
