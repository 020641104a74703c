"""Split a sharded model's request by the workers that hold its rows; gather their answers in order.

Row ``r`` of a request for a sharded model needs table row ``ids[r]`` (the ``sharding.by``
input), which lives with the holders of :func:`hashing.shards.hash_id` ``(ids[r])`` on the
ring. Rows are grouped by their first *two* holders on the ring the router uses, not just the
first: if a group's worker dies, the whole group moves to one worker, the one that holds (or,
with one replica, loads) all its rows. Each group becomes one call, routed by the ring
position of its first row; answers are put back in the request's row order.

Pure Python: tensors are raw little-endian bytes, so rows are slices.
"""

from __future__ import annotations

import sys
from array import array
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.errors import BadGateway, BadRequest
from hashing.shards import hash_id
from tasks.contract import Result, Tensor
from tasks.metadata import Sharding

Placement = Callable[[list[int]], list[tuple[str, ...]]]  # ring positions -> their first two holders


@dataclass(frozen=True)
class Part:
    """The rows of a request that go to one worker: their indices in the request, ascending."""

    rows: tuple[int, ...]
    position: int  # ring position of its first row: where it is routed
    tensors: list[Tensor]


def row_ids(tensor: Tensor) -> list[int]:
    """The values of an INT64 tensor of shape [n] (little-endian on the wire)."""
    ids = array("q", tensor.data)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tolist()


def take_rows(tensor: Tensor, rows: Sequence[int]) -> Tensor:
    """The rows ``rows`` of ``tensor``, in that order."""
    size = len(tensor.data) // tensor.shape[0]
    data = b"".join(tensor.data[r * size : (r + 1) * size] for r in rows)
    return Tensor(tensor.name, tensor.datatype, (len(rows), *tensor.shape[1:]), data)


def split(tensors: list[Tensor], sharding: Sharding, placement: Placement) -> list[Part]:
    """The request's rows grouped by where they are held. Raises BadRequest for an id outside the table."""
    by = next(t for t in tensors if t.name == sharding.by)
    ids = row_ids(by)
    for value in ids:
        if not 0 <= value < sharding.rows:
            raise BadRequest(f"{sharding.by} {value} is outside the table: ids run from 0 to {sharding.rows - 1}")
    positions = [hash_id(value) for value in ids]
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for row, holders in enumerate(placement(positions)):
        groups[holders].append(row)
    if len(groups) == 1:
        return [Part(tuple(range(len(ids))), positions[0], tensors)]
    return [Part(tuple(rows), positions[rows[0]], [take_rows(t, rows) for t in tensors]) for rows in groups.values()]


def gather(parts: list[Part], results: list[Result], rows: int) -> Result:
    """One result in the request's row order, from each part's (``results[i]`` answers ``parts[i]``)."""
    for part, result in zip(parts, results, strict=True):
        shapes = [(t.name, t.shape[0]) for t in result.outputs]
        if shapes != [(t.name, len(part.rows)) for t in results[0].outputs]:
            raise BadGateway(f"worker {result.node} answered {shapes} for {len(part.rows)} rows")
    if len(parts) == 1:
        return results[0]
    outputs = []
    for k, first in enumerate(results[0].outputs):
        placed: list[bytes] = [b""] * rows
        for part, result in zip(parts, results, strict=True):
            out = result.outputs[k]
            size = len(out.data) // len(part.rows)
            for i, row in enumerate(part.rows):
                placed[row] = out.data[i * size : (i + 1) * size]
        outputs.append(Tensor(first.name, first.datatype, (rows, *first.shape[1:]), b"".join(placed)))
    nodes = ",".join(sorted({r.node for r in results}))
    return Result(results[0].id, nodes, max(r.batch_size for r in results), results[0].version, tuple(outputs))
