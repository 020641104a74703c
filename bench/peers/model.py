"""What every peer does per request: read our JSON body, run the model, shape the reply.

All peers go through this module so that they run exactly ringserve's model math
(``tasks.repository`` → ``tasks.engine``) and differ only in how a request reaches it.
The body is ringserve's simple API: ``{"model": "digits", "key": "user-42", "input": rows}``,
``rows`` a list of rows or one flat row; the reply is ``{"model", "output", "batch_size"}``,
one flat output row for one flat input row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.repository import Repository

MODEL_ENV = "RINGSERVE_PEER_MODEL"  # the model a peer's worker processes serve
REPOSITORY_ENV = "RINGSERVE_MODEL_REPOSITORY"  # the same variable ringserve's settings read


class BadRequest(ValueError):
    """A body this peer cannot serve (HTTP 400)."""


@dataclass(frozen=True)
class Rows:
    """The input of one request: ``rows`` is [n, row size] float32."""

    rows: np.ndarray
    flat: bool  # the body sent one flat row, so the reply is one flat row


@dataclass(frozen=True)
class Signature:
    """What a peer needs to check a request without loading any weights."""

    model: str
    input_name: str
    output_name: str
    row_size: int

    @classmethod
    def of(cls, repository: Repository, model: str) -> Signature:
        metadata = repository.metadata(model)
        return cls(model, metadata.inputs[0].name, metadata.outputs[0].name, metadata.inputs[0].row_size)

    def parse(self, body: Any) -> Rows:
        """The rows of ``body``; raises BadRequest before anything joins a batch."""
        if not isinstance(body, dict) or "input" not in body:
            raise BadRequest('the body must be a JSON object with an "input"')
        if body.get("model", self.model) != self.model:
            raise BadRequest(f"this peer serves model {self.model!r} only, not {body['model']!r}")
        try:
            rows = np.asarray(body["input"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"input is not a list of numbers: {exc}") from None
        flat = rows.ndim == 1
        rows = rows[None] if flat else rows
        if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != self.row_size:
            raise BadRequest(f"input must be rows of {self.row_size} numbers, got shape {list(rows.shape)}")
        return Rows(rows, flat)

    def reply(self, request: Rows, output: np.ndarray, batch_size: int) -> dict[str, Any]:
        """The JSON reply; ``batch_size`` counts the rows of its forward pass, as ringserve's replies do."""
        out = output[0] if request.flat else output
        return {"model": self.model, "output": out.tolist(), "batch_size": batch_size}


class Runner:
    """One model, loaded once, run on the rows of many requests in one forward pass."""

    def __init__(self, repository_root: str, model: str) -> None:
        repository = Repository(repository_root)
        self.signature = Signature.of(repository, model)
        self._model = repository.get(model)

    def forward(self, rows: np.ndarray) -> np.ndarray:
        """Outputs for [n, row size] rows, [n, output size]."""
        signature = self.signature
        return self._model.forward({signature.input_name: rows})[signature.output_name]

    def forward_batch(self, requests: Sequence[Rows]) -> list[np.ndarray]:
        """One output array per request, in order, from a single forward pass over all rows."""
        output = self.forward(np.concatenate([r.rows for r in requests]))
        bounds = np.cumsum([len(r.rows) for r in requests])[:-1]
        return np.split(output, bounds)


def total_rows(requests: Sequence[Rows]) -> int:
    """The rows of a batch of requests (a batch's size in ringserve's terms)."""
    return sum(len(r.rows) for r in requests)
