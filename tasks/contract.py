"""What the gateway and the workers agree on: queue and key names, message fields, datatypes.

Both sides import this module and nothing else of each other's, so a name is spelled once.
It imports only the standard library.

A Celery message of task :data:`TASK_NAME` carries one *envelope* (its only argument)::

    {"reply_to": "<reply list key>", "items": [item, ...]}

    item  = {"id": str, "model": str, "version": str, "deadline_ms": float,
             "inputs": [tensor, ...]}
    tensor = [name, datatype, shape, raw little-endian bytes]

The worker answers each item on the ``reply_to`` list (RPUSH of one msgpack blob per batch)::

    reply = {"id": str, "node": str, "batch_size": int, "version": str, "outputs": [tensor, ...]}
          | {"id": str, "node": str, "status": int, "error": str}
"""

from __future__ import annotations

from typing import NamedTuple

TASK_NAME = "ringserve.infer"
QUEUE_PREFIX = "ringserve."
KEY_PREFIX = "ringserve:"

MEMBERS_KEY = KEY_PREFIX + "members"  # set of node ids that ever announced themselves
STATS_ROUTED_KEY = KEY_PREFIX + "stats:routed"  # hash node -> requests routed to it
STATS_BATCHES_KEY = KEY_PREFIX + "stats:batch_sizes"  # hash rows-per-forward -> count
STATS_ERRORS_KEY = KEY_PREFIX + "stats:errors"  # hash HTTP status -> count
STATS_EXPIRED_KEY = KEY_PREFIX + "stats:expired"  # hash node -> requests skipped, deadline passed


def queue_name(node_id: str) -> str:
    """The Celery queue (a Redis list) that only worker ``node_id`` consumes."""
    return QUEUE_PREFIX + node_id


def member_key(node_id: str) -> str:
    """Announcement of a live worker; it expires unless the worker refreshes it."""
    return KEY_PREFIX + "member:" + node_id


def reply_key(gateway_id: str) -> str:
    """The list on which workers push results for one gateway process."""
    return KEY_PREFIX + "reply:" + gateway_id


def node_id_from_hostname(hostname: str) -> str:
    """Celery names a worker ``worker_1@host``; the ring knows it as ``worker_1``."""
    return hostname.split("@", 1)[0]


class Datatype(NamedTuple):
    """How one Open Inference Protocol datatype travels: array typecode and numpy dtype."""

    typecode: str  # for the standard library's ``array`` (gateway side)
    numpy: str  # for ``numpy.frombuffer`` (worker side)
    itemsize: int


DATATYPES: dict[str, Datatype] = {
    "BOOL": Datatype("b", "?", 1),
    "UINT8": Datatype("B", "u1", 1),
    "INT8": Datatype("b", "i1", 1),
    "INT16": Datatype("h", "i2", 2),
    "INT32": Datatype("i", "i4", 4),
    "INT64": Datatype("q", "i8", 8),
    "FP32": Datatype("f", "f4", 4),
    "FP64": Datatype("d", "f8", 8),
}
