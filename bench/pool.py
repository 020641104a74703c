"""A pool of prepared v2 requests with the answers each must get: for loads whose every answer is checked.

The scenario builds the pool once, in its own process, from the in-process reference model
(``tasks.repository.Repository(..., sharding=False)``: the whole model, no ring), and saves it in
one ``.npz``; each client process reads it and sends request ``i mod size`` for key index ``i``,
so a record's ``key`` names the request it sent. An answer is valid only when every output equals
the reference to :data:`TOLERANCE` (absolute); one that does not is recorded with the error
:data:`MISMATCH`, so a run counts its wrong answers apart from its failed requests.

Inputs are drawn per request: 1 to ``max_rows`` rows; a sharded model's shard-key input uniform
over the table's rows (``[0, rows)``); FP32 inputs k / 10,000 for integers k in ±20,000, whose
JSON text is short and parses back to exactly the float32 the reference saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.payload import Reply
from tasks.metadata import ModelMetadata, TensorSpec

TOLERANCE = 1e-6
MISMATCH = "mismatch"
FEATURE_TICKS = 20_000  # FP32 inputs are k / FEATURE_SCALE, |k| <= this
FEATURE_SCALE = 10_000.0
REFERENCE_CHUNK_ROWS = 65_536  # rows per reference forward while building

Forward = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def _draw(spec: TensorSpec, meta: ModelMetadata, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    """One input of one request: (the array the reference gets, the flat values the JSON carries)."""
    if meta.sharding is not None and spec.name == meta.sharding.by:
        ids = rng.integers(0, meta.sharding.rows, rows, dtype=np.int64)
        return ids, ids.tolist()
    if spec.datatype == "FP32" and len(spec.shape) == 2 and spec.shape[1] > 0:
        ticks = rng.integers(-FEATURE_TICKS, FEATURE_TICKS + 1, (rows, spec.shape[1]))
        exact = ticks / FEATURE_SCALE  # float64: its shortest text parses back to this double
        return exact.astype(np.float32), exact.ravel().tolist()
    raise ValueError(f"no request generator for input {spec.name} ({spec.datatype}, shape {list(spec.shape)})")


class RequestPool:
    """``size`` v2 request bodies for ``model`` and, per output, the flat values each answer must carry."""

    api = "v2"

    def __init__(self, model: str, bodies: list[bytes], expected: dict[str, list[np.ndarray]]) -> None:
        self.model = model
        self.path = f"/v2/models/{model}/infer"
        self.bodies = bodies
        self.expected = expected

    def __len__(self) -> int:
        return len(self.bodies)

    @classmethod
    def build(cls, meta: ModelMetadata, forward: Forward, size: int, max_rows: int, seed: int = 0) -> RequestPool:
        """``size`` requests of 1..``max_rows`` rows each, and what ``forward`` (the reference) answers to them."""
        rng = np.random.default_rng(seed)
        bodies: list[bytes] = []
        arrays: list[dict[str, np.ndarray]] = []
        for rows in rng.integers(1, max_rows + 1, size).tolist():
            drawn = {spec.name: _draw(spec, meta, rows, rng) for spec in meta.inputs}
            tensors = [
                {"name": s.name, "shape": [rows, *s.shape[1:]], "datatype": s.datatype, "data": drawn[s.name][1]}
                for s in meta.inputs
            ]
            bodies.append(orjson.dumps({"inputs": tensors}))
            arrays.append({name: value[0] for name, value in drawn.items()})
        expected: dict[str, list[np.ndarray]] = {spec.name: [] for spec in meta.outputs}
        for start in range(0, size, 1024):  # one forward per chunk of requests, split back per request
            chunk = arrays[start : start + 1024]
            counts = [len(next(iter(a.values()))) for a in chunk]
            joined = {name: np.concatenate([a[name] for a in chunk]) for name in chunk[0]}
            outputs = forward(joined)
            for name in expected:
                flat = np.asarray(outputs[name], dtype=np.float64).reshape(sum(counts), -1)
                expected[name] += [part.ravel() for part in np.split(flat, np.cumsum(counts)[:-1])]
        return cls(meta.name, bodies, expected)

    def save(self, path: Path) -> Path:
        arrays = {
            "blob": np.frombuffer(b"".join(self.bodies), dtype=np.uint8),
            "body_offsets": np.cumsum([0] + [len(b) for b in self.bodies]),
        }
        for name, parts in self.expected.items():
            arrays[f"out_{name}"] = np.concatenate(parts)
            arrays[f"out_offsets_{name}"] = np.cumsum([0] + [len(p) for p in parts])
        arrays["model"] = np.array(self.model)
        np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub takes the keywords for allow_pickle
        return path

    @classmethod
    def read(cls, path: str | Path) -> RequestPool:
        with np.load(path) as saved:
            blob, offsets = saved["blob"].tobytes(), saved["body_offsets"]
            bodies = [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            expected = {}
            for key in saved.files:
                if key.startswith("out_") and not key.startswith("out_offsets_"):
                    flat, ends = saved[key], saved[f"out_offsets_{key[4:]}"]
                    expected[key[4:]] = [flat[ends[i] : ends[i + 1]] for i in range(len(ends) - 1)]
            return cls(str(saved["model"]), bodies, expected)

    def body(self, key: str, index: int) -> bytes:
        """Request ``index mod size`` (``key`` is unused: a sharded request is routed by its rows)."""
        return self.bodies[index % len(self.bodies)]

    def parse(self, raw: bytes, index: int) -> Reply:
        """Valid when every output of the answer to request ``index`` equals the reference to :data:`TOLERANCE`."""
        try:
            doc: Any = orjson.loads(raw)
            params = doc.get("parameters") or {}
            given = {out["name"]: out["data"] for out in doc["outputs"]}
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            return Reply(False)
        node, batch, cached = params.get("node"), params.get("batch_size"), params.get("cached")
        reply = Reply(
            True,
            node if isinstance(node, str) else None,
            batch if isinstance(batch, int) else None,
            cached if isinstance(cached, bool) else None,
        )
        for name, parts in self.expected.items():
            want = parts[index % len(parts)]
            try:
                got = np.asarray(given[name], dtype=np.float64).ravel()
            except (KeyError, TypeError, ValueError):
                return Reply(False, reply.node, reply.batch_size, error=f"no output {name}")
            if got.shape != want.shape or not bool(np.all(np.abs(got - want) <= TOLERANCE)):
                return Reply(False, reply.node, reply.batch_size, error=MISMATCH)
        return reply
